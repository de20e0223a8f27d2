#!/bin/sh
# SPDX-License-Identifier: Apache-2.0
# Decrypts a keywarden key bundle with the openssl command line and the secret file only.
# It is the step-by-step procedure of docs/bundle-format.md as a script; CI runs it.
#
#   docs/decrypt-bundle.sh BUNDLE SECRET OUTDIR
#   BACKUP_MASTER_KEY=... docs/decrypt-bundle.sh BACKUP - OUTDIR     (a key store v1 backup)
#
# For entry N (counting from 1) it writes OUTDIR/N.json (the key's metadata) and, when the entry
# carries a key, OUTDIR/N.key (the key: 32 raw bytes for AES and HMAC keys, PKCS#8 DER for EC
# private keys, possibly followed by zero padding). Exit 4 if the bundle does not verify.
#
# The openssl command line takes keys as arguments (-K, -macopt hexkey:), which other users of
# the machine can read in ps and /proc/*/cmdline while it runs. Run this only on an offline,
# single-user machine, and remove OUTDIR afterwards: it holds every key in the clear.
set -eu
bundle=$1 secret=$2 out=$3
mkdir -p "$out"
chmod 700 "$out"

hexof() { base64 -d | od -An -v -tx1 | tr -d ' \n'; }
if [ "$secret" = "-" ]; then
  # A key store v1 backup: its two keys are HMAC-SHA256(backup key, label).
  BK=$(printf %s "$BACKUP_MASTER_KEY" | hexof)
  derive() { printf %s "$1" | openssl mac -digest SHA256 -macopt "hexkey:$BK" HMAC; }
  ENC=$(derive "keywarden v1 backup encryption key")
  SIG=$(derive "keywarden v1 backup signature key")
  magic="keywarden-v1-backup 1"
else
  # The secret file's fields, as hex.
  field() { grep -o "\"$1\": *\"[^\"]*\"" "$secret" | sed 's/.*"\([^"]*\)"$/\1/'; }
  ENC=$(field encryption | hexof)
  SIG=$(field signature | hexof)
  magic="keywarden-bundle 1"
fi

# 1. The first line names the format.
[ "$(head -n 1 "$bundle")" = "$magic" ] || { echo "not a $magic file" >&2; exit 4; }

# 2. The last line is "mac " and the HMAC-SHA256, under the signature key, of every byte before it.
lines=$(wc -l < "$bundle")
want=$(tail -n 1 "$bundle" | sed -n 's/^mac //p')
got=$(head -n $((lines - 1)) "$bundle" | openssl mac -digest SHA256 -macopt "hexkey:$SIG" HMAC | tr 'A-F' 'a-f')
[ -n "$want" ] && [ "$got" = "$want" ] || { echo "the bundle does not verify (MAC mismatch)" >&2; exit 4; }

# 3. The metadata key is HMAC-SHA256(signature key, "keywarden bundle v1 metadata key").
META=$(printf %s "keywarden bundle v1 metadata key" | openssl mac -digest SHA256 -macopt "hexkey:$SIG" HMAC)

# 4. Entries are lines 3 .. last-1: "base64(IV || AES-256-CTR(metadata))" and the wrapped key or "-".
n=0
sed -n "3,$((lines - 1))p" "$bundle" | while read -r meta wrapped; do
  n=$((n + 1))
  printf %s "$meta" | base64 -d > "$out/$n.meta"
  iv=$(head -c 16 "$out/$n.meta" | od -An -v -tx1 | tr -d ' \n')
  tail -c +17 "$out/$n.meta" | openssl enc -d -aes-256-ctr -K "$META" -iv "$iv" > "$out/$n.json"
  rm "$out/$n.meta"
  if [ "$wrapped" != "-" ]; then
    # RFC 5649 key wrap with padding; A65959A6 is its alternative initial value.
    printf %s "$wrapped" | base64 -d |
      openssl enc -d -id-aes256-wrap-pad -K "$ENC" -iv A65959A6 > "$out/$n.key"
  fi
done
echo "decrypted $((lines - 3)) entries into $out"
