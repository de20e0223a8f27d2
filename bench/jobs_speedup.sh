#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# The --jobs speed-up of export, verify and import --init, as keywarden processes: N keys on two
# private SoftHSM tokens under $TMPDIR (default /tmp; /dev/shm keeps file-system noise out), each
# command timed with --jobs 1 and --jobs 2, and the ratio printed.
#
#   bench/jobs_speedup.sh [N] [path/to/keywarden] [symmetric|acra]
#
# symmetric (the default): N clients with one AES key each. acra: N/3 clients (rounded up) with
# Acra's three per-client keys each (EC storage keypair, AES key, HMAC key).
set -euo pipefail
n=${1:-20000}
kw=$(realpath "${2:-build/keywarden}")
mix=${3:-symmetric}
case $mix in
  symmetric) kinds=(--symmetric) clients=$n ;;
  acra) kinds=(--storage-keypair --symmetric --hmac) clients=$(((n + 2) / 3)) n=$((clients * 3)) ;;
  *) echo "usage: $0 [N] [path/to/keywarden] [symmetric|acra]" >&2; exit 2 ;;
esac
d=$(mktemp -d "${TMPDIR:-/tmp}/kw-jobs-XXXXXX")
trap 'rm -rf "$d"' EXIT
mkdir -p "$d/t"
printf 'directories.tokendir = %s/t\nobjectstore.backend = file\nlog.level = ERROR\n' "$d" > "$d/c.conf"
export SOFTHSM2_CONF=$d/c.conf KEYWARDEN_MODULE=/usr/lib/softhsm/libsofthsm2.so
export KEYWARDEN_PIN_SOURCE=env:BENCH_PIN BENCH_PIN=bench-pin KEYWARDEN_KEYSTORE=$d/ks
for l in src dst; do softhsm2-util --init-token --free --label "$l" --so-pin so-pin --pin bench-pin >/dev/null; done
seq -f "client%07g" 1 "$clients" > "$d/ids.txt"
"$kw" --token label:src init >/dev/null 2>&1
"$kw" generate --client-ids-from "$d/ids.txt" "${kinds[@]}" >/dev/null 2>&1

secs() { local t0 t1; t0=$(date +%s.%N); "$@" >/dev/null 2>&1; t1=$(date +%s.%N); awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }'; }
row() {
  local what=$1 a=$2 b=$3
  printf '%-16s %8d %10.3f %10.3f %8.2fx\n' "$what" "$n" "$a" "$b" "$(awk -v a="$a" -v b="$b" 'BEGIN { print a / b }')"
}
echo "$n keys ($mix: $clients clients x ${kinds[*]})"
printf '%-16s %8s %10s %10s %9s\n' operation keys "jobs 1 s" "jobs 2 s" speed-up
e1=$(secs "$kw" export --all --private-keys --jobs 1 --key-bundle-file "$d/b1" --key-bundle-secret "$d/s1")
e2=$(secs "$kw" export --all --private-keys --jobs 2 --key-bundle-file "$d/b2" --key-bundle-secret "$d/s2")
row export "$e1" "$e2"
v1=$(secs "$kw" verify --jobs 1 --key-bundle-file "$d/b1" --key-bundle-secret "$d/s1")
v2=$(secs "$kw" verify --jobs 2 --key-bundle-file "$d/b1" --key-bundle-secret "$d/s1")
row verify "$v1" "$v2"
i1=$(secs "$kw" --keystore "$d/i1" --token label:dst import --init --jobs 1 --key-bundle-file "$d/b1" --key-bundle-secret "$d/s1")
i2=$(secs "$kw" --keystore "$d/i2" --token label:dst import --init --jobs 2 --key-bundle-file "$d/b1" --key-bundle-secret "$d/s1")
row "import --init" "$i1" "$i2"
echo "target: at least 1.7x with 2 jobs on a 2-core machine"
