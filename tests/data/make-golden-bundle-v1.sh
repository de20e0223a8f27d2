#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Writes tests/data/bundle-v1/: a bundle and its secret file exported (--all --private-keys) from
# the golden key store in tests/data/keystore-v2, whose expected.json gives every key's material.
# Run once per bundle format version; the result is committed and imported by every later version.
set -euo pipefail
cd "$(dirname "$0")/../.."
kw=$(pwd)/${KW:-build/keywarden}
out=tests/data/bundle-v1
if [ -e "$out" ]; then echo "$out exists: golden files are never regenerated" >&2; exit 1; fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp -r tests/data/keystore-v2/. "$work/"
chmod -R go-rwx "$work"
sed "s|@TOKENDIR@|$work/tokens|g" hsm-config/softhsm2.conf.in > "$work/softhsm2.conf"
export SOFTHSM2_CONF="$work/softhsm2.conf" KEYWARDEN_MODULE=/usr/lib/softhsm/libsofthsm2.so
export KEYWARDEN_PIN_SOURCE="file:$work/user.pin" KEYWARDEN_KEYSTORE="$work/store"
mkdir -p "$out"
"$kw" export --all --private-keys --key-bundle-file "$out/bundle.dat" --key-bundle-secret "$out/secret.json"
echo "wrote $out"
