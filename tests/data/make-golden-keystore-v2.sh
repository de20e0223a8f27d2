#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Writes tests/data/keystore-v2/: a SoftHSM token directory, a v2 key store made on it, the
# token's PIN, and expected.json with every key's material as `keywarden read` gives it.
# Run once per store format version; the result is committed and read by every later version.
set -euo pipefail
cd "$(dirname "$0")/../.."
kw=${KW:-build/keywarden}
out=tests/data/keystore-v2
if [ -e "$out" ]; then echo "$out exists: golden files are never regenerated" >&2; exit 1; fi
umask 077
mkdir -p "$out/tokens"
printf 'golden-user-pin\n' > "$out/user.pin"
sed "s|@TOKENDIR@|$(pwd)/$out/tokens|" hsm-config/softhsm2.conf.in > "$out/softhsm2.conf"
export SOFTHSM2_CONF="$(pwd)/$out/softhsm2.conf"
softhsm2-util --init-token --free --label kw-golden --so-pin golden-so-pin --pin golden-user-pin >/dev/null
export KEYWARDEN_MODULE=/usr/lib/softhsm/libsofthsm2.so KEYWARDEN_PIN_SOURCE="file:$(pwd)/$out/user.pin"
export KEYWARDEN_KEYSTORE="$out/store"
"$kw" --token kw-golden init
"$kw" generate --client-id golden-client --poison-record-keys --audit-log-key
"$kw" generate --client-id "second client"
"$kw" rotate client/golden-client/symmetric client/golden-client/storage
"$kw" destroy "client/second client/hmac" --version 1

. tests/data/expected-json.sh
write_expected "$kw" "$out/expected.json"
rm "$out/softhsm2.conf"  # rendered again by the test, for its own directory
echo "wrote $out"
