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
mkdir -p "$qs/tokens"
chmod 700 "$qs" "$qs/tokens"
sed "s|@TOKENDIR@|$qs/tokens|" hsm-config/softhsm2.conf.in > "$qs/softhsm2.conf"
export SOFTHSM2_CONF="$qs/softhsm2.conf"
export KEYWARDEN_MODULE=/usr/lib/softhsm/libsofthsm2.so

# The demo token's PINs live in 0600 files. softhsm2-util only takes PINs on its command line,
# which is acceptable for a throwaway demo token and never done by keywarden itself.
umask 077
label=keywarden-quickstart
if [ ! -s "$qs/user.pin" ]; then
  openssl rand -hex 12 > "$qs/user.pin"
  openssl rand -hex 12 > "$qs/so.pin"
fi
if ! softhsm2-util --show-slots 2>/dev/null | grep -q "Label:.*$label"; then
  softhsm2-util --init-token --free --label "$label" \
    --so-pin "$(cat "$qs/so.pin")" --pin "$(cat "$qs/user.pin")" >/dev/null
fi
export KEYWARDEN_TOKEN="label:$label"
export KEYWARDEN_PIN_SOURCE="file:$qs/user.pin"
kw="$root/build/keywarden"

step() { printf '\n$ keywarden %s\n' "$*"; }

step token list
"$kw" token list
step token check
"$kw" token check

printf '\nquickstart done: the token lives in %s\n' "$qs"
