#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Writes tests/data/keystore-v1/: a SoftHSM token directory, a v1 key store made on it (with a
# rotated key and a destroyed version), the token's PIN, and expected.json with every key's
# material; and tests/data/backup-v1/: a v1 backup of that store and the backup key it showed.
# Run once per format version; the result is committed and read by every later version.
set -euo pipefail
cd "$(dirname "$0")/../.."
kw=${KW:-build/keywarden}
out=tests/data/keystore-v1 bout=tests/data/backup-v1
for d in "$out" "$bout"; do
  if [ -e "$d" ]; then echo "$d exists: golden files are never regenerated" >&2; exit 1; fi
done
umask 077
mkdir -p "$out/tokens" "$bout"
printf 'golden-user-pin\n' > "$out/user.pin"
sed "s|@TOKENDIR@|$(pwd)/$out/tokens|" hsm-config/softhsm2.conf.in > "$out/softhsm2.conf"
export SOFTHSM2_CONF="$(pwd)/$out/softhsm2.conf"
softhsm2-util --init-token --free --label kw-golden-v1 --so-pin golden-so-pin --pin golden-user-pin >/dev/null
export KEYWARDEN_MODULE=/usr/lib/softhsm/libsofthsm2.so KEYWARDEN_PIN_SOURCE="file:$(pwd)/$out/user.pin"
export KEYWARDEN_KEYSTORE="$out/store"
"$kw" --token kw-golden-v1 init --store-version 1
"$kw" generate --client-id golden-client --poison-record-keys --audit-log-key
"$kw" generate --client-id "second client"
"$kw" rotate client/golden-client/symmetric client/golden-client/storage
"$kw" destroy "client/second client/hmac" --version 1
. tests/data/expected-json.sh
write_expected "$kw" "$out/expected.json"
"$kw" backup --action=export --file "$bout/backup.dat" --backup-key-out "$bout/backup-key.txt"
rm "$out/softhsm2.conf"  # rendered again by the test, for its own directory
echo "wrote $out and $bout"
