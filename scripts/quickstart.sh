#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Runs keywarden end to end on an embedded default: a SoftHSM token kept under .quickstart/
# in the project folder (git ignores it). Safe to run again: it reuses the token.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

scripts/install-deps.sh
if [ ! -f build/build.ninja ]; then meson setup build >/dev/null; fi
ninja -C build keywarden >/dev/null

qs="$root/.quickstart"
umask 077
mkdir -p "$qs/tokens"
chmod 700 "$qs" "$qs/tokens"
sed "s|@TOKENDIR@|$qs/tokens|g" hsm-config/softhsm2.conf.in > "$qs/softhsm2.conf"
export SOFTHSM2_CONF="$qs/softhsm2.conf"
export KEYWARDEN_MODULE=/usr/lib/softhsm/libsofthsm2.so

# Two demo tokens: the store's, and a second one to restore the backup on. Their PINs live in
# 0600 files. softhsm2-util only takes PINs on its command line, which is acceptable for a
# throwaway demo token and never done by keywarden itself.
label=keywarden-quickstart
restore=keywarden-restore
if [ ! -s "$qs/user.pin" ]; then
  openssl rand -hex 12 > "$qs/user.pin"
  openssl rand -hex 12 > "$qs/so.pin"
fi
for l in "$label" "$restore"; do
  if ! softhsm2-util --show-slots 2>/dev/null | grep -q "Label:.*$l *$"; then
    softhsm2-util --init-token --free --label "$l" \
      --so-pin "$(cat "$qs/so.pin")" --pin "$(cat "$qs/user.pin")" >/dev/null
  fi
done
export KEYWARDEN_PIN_SOURCE="file:$qs/user.pin"
kw="$root/build/keywarden"

# Each run works in a new folder: store A on the first token, its backup, store B restored.
run="$qs/run-$(date -u +%Y%m%dT%H%M%S)-$$"
mkdir -p "$run"
a="$run/store-a" b="$run/store-b"
bundle="$run/encrypted-keys.dat" secret="$run/access-keys.json"

step() { printf '\n$ keywarden %s\n' "$*"; "$kw" "$@"; }

step token list
step --token "label:$label" token check
step --keystore "$a" --token "label:$label" init
step --keystore "$a" generate --client-id alice01 --poison-record-keys --audit-log-key
step --keystore "$a" generate --client-id bob01
step --keystore "$a" rotate client/alice01/symmetric
step --keystore "$a" list --rotated
step --keystore "$a" keystore verify
step --keystore "$a" export --all --private-keys --key-bundle-file "$bundle" --key-bundle-secret "$secret"
step --keystore "$a" verify --key-bundle-file "$bundle" --key-bundle-secret "$secret" --against-store
step --keystore "$b" --token "label:$restore" import --init --key-bundle-file "$bundle" --key-bundle-secret "$secret"
step --keystore "$b" keystore verify

# Compares every key version of two stores byte for byte, without showing any key.
# Each key version of a store: key id, version (* = current), state, valid from, valid until.
versions_of() {
  "$kw" --keystore "$1" list --rotated | awk 'NR > 1 && NF >= 6 { printf "%s\t%s\t%s\t%s\t%s\n", $1, $3, $4, $5, $6 }'
}

# Both stores hold the same versions (with their states, dates and current flags), and every key
# half in them is identical.
compare() {
  local x=$1 y=$2 same=0 vx vy
  printf '\ncomparing every key in %s with %s\n' "$x" "$y"
  vx=$(versions_of "$x") || { echo "cannot list $x" >&2; exit 1; }
  vy=$(versions_of "$y") || { echo "cannot list $y" >&2; exit 1; }
  if [ -z "$vx" ]; then
    echo "no keys in $x to compare" >&2
    exit 1
  fi
  if [ "$vx" != "$vy" ]; then
    echo "DIFFERENT: the stores hold other versions, states or dates:" >&2
    diff <(printf '%s\n' "$vx") <(printf '%s\n' "$vy") >&2 || true
    exit 1
  fi
  while IFS=$'\t' read -r id version state _; do
    version=${version%\*}
    for half in --private --public; do
      case "$half$id" in --public*/storage|--publicpoison/keypair|--private*) ;; *) continue;; esac
      [ "$state" = destroyed ] && [ "$half" = --private ] && continue
      if cmp -s <("$kw" --keystore "$x" read "$id" "$half" --version "$version" --format raw) \
                <("$kw" --keystore "$y" read "$id" "$half" --version "$version" --format raw); then
        same=$((same + 1))
      else
        echo "DIFFERENT: $id version $version ($half)" >&2
        exit 1
      fi
    done
  done <<< "$vx"
  printf 'all %d versions listed alike, and all %d key halves identical, in both stores\n' \
    "$(printf '%s\n' "$vx" | wc -l)" "$same"
}

compare "$a" "$b"

# Key store v1 (Acra's v1 layout, one master key): its one-file backup restored on the second
# token, then the v1 store migrated into a new v2 store there.
v1="$run/store-v1" v1b="$run/store-v1-restored" v2m="$run/store-v2-migrated"
v1file="$run/v1-encrypted-keys.dat" v1key="$run/v1-backup-key.txt"
step --keystore "$v1" --token "label:$label" init --store-version 1
step --keystore "$v1" generate --client-id alice01 --audit-log-key
step --keystore "$v1" rotate client/alice01/storage
# No terminal in CI: the backup key goes to a new 0600 file instead of /dev/tty.
step --keystore "$v1" backup --action=export --file "$v1file" --backup-key-out "$v1key"
BACKUP_MASTER_KEY=$(sed -n 's/^Backup master key: //p' "$v1key")
export BACKUP_MASTER_KEY
step --keystore "$v1b" --token "label:$restore" backup --action=import --file "$v1file" --init
unset BACKUP_MASTER_KEY
compare "$v1" "$v1b"
step --keystore "$v2m" --token "label:$restore" init
step migrate --src-keystore "$v1" --dst-keystore "$v2m"
compare "$v1" "$v2m"
printf '\nquickstart done: tokens in %s, this run in %s\n' "$qs/tokens" "$run"
