#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Runs backup-bench R times with the same arguments and prints, for every row that has a target
# (the ratios against the floors, the --jobs speed-ups, the peak RSS), each run's figure and
# their median. On a shared machine one run can land in a slow spell of a few seconds, which
# inflates whichever ratio or speed-up was being timed then; the median of R runs does not
# depend on one such spell. Each run's whole output is kept beside the summary.
#
#   bench/repeat_bench.sh R OUTDIR [backup-bench arguments...]
#   e.g. TMPDIR=/dev/shm bench/repeat_bench.sh 5 /tmp/rb --keys 10000 --kinds acra --cli build/keywarden --jobs 2
#   bench/repeat_bench.sh --summary OUTDIR    (the summary again, of the run-*.txt files there)
#
# The backup-bench binary is build/bench/backup-bench unless BACKUP_BENCH names another.
set -euo pipefail
usage() { echo "usage: $0 R OUTDIR [backup-bench arguments...] | $0 --summary OUTDIR" >&2; exit 2; }
if [ $# -eq 2 ] && [ "$1" = --summary ]; then
  out=$2
  rounds=$(find "$out" -maxdepth 1 -name 'run-*.txt' | wc -l)
  [ "$rounds" -gt 0 ] || { echo "$0: no run-*.txt in $out" >&2; exit 2; }
else
  if [ $# -lt 2 ] || ! [[ $1 =~ ^[1-9][0-9]*$ ]]; then usage; fi
  rounds=$1 out=$2
  shift 2
  bench=${BACKUP_BENCH:-build/bench/backup-bench}
  [ -x "$bench" ] || { echo "$0: no $bench (build first, or set BACKUP_BENCH)" >&2; exit 2; }
  mkdir -p "$out"
  for ((r = 1; r <= rounds; r++)); do
    echo "run $r of $rounds: $bench $*" >&2
    "$bench" "$@" > "$out/run-$r.txt" 2>&1 || { echo "$0: run $r failed; see $out/run-$r.txt" >&2; exit 1; }
  done
fi

# Rows with a target:
#   "<name> <keys> <wall> <keys/s> <floor> <ratio> <= <target>"   (ratio against a floor)
#   "keywarden <cmd> --jobs 2 <keys> <wall> <user> <sys> <rss> <= 64" (peak RSS, MiB)
#   "<name> <keys> <1 proc s> <J procs s> <speed-up>x [rounds: ...]"  (speed-ups; with --repeat,
#   the medians of that run's rounds)
{
  head -n 1 "$out/run-1.txt"
  echo "runs: $rounds ($out/run-*.txt); each figure below is one run's, then the median of the runs"
  echo
  for ((r = 1; r <= rounds; r++)); do
    awk -v run="$r" '
      / <= [0-9.]+$/ && $(NF-2) ~ /^[0-9.]+$/ && NF >= 8 && $0 !~ /MiB/ {
        name = $0; sub(/ +[0-9]+ +[0-9.]+ +[0-9]+ +[0-9.]+ +[0-9.]+ +<= [0-9.]+$/, "", name)
        if (name != $0) { print "ratio\t" name " (target <= " $NF ")\t" run "\t" $(NF-2); next }
      }
      /^keywarden .* <= 64$/ {
        name = $0; sub(/ +[0-9]+ +[0-9.]+ +[0-9.]+ +[0-9.]+ +[0-9.]+ +<= 64$/, "", name)
        print "rss\t" name " peak RSS MiB (target <= 64)\t" run "\t" $(NF-2); next
      }
      / [0-9]+ +[0-9.]+ +[0-9.]+ +[0-9.]+x( +rounds:.*)?$/ {
        name = $0; sub(/ +[0-9]+ +[0-9.]+ +[0-9.]+ +[0-9.]+x( +rounds:.*)?$/, "", name)
        for (i = 1; i <= NF; i++) if ($i ~ /^[0-9.]+x$/) { v = $i; sub(/x$/, "", v) }
        print "speedup\t" name " --jobs speed-up" (name ~ /^keywarden/ ? " (target >= 1.7)" : "") "\t" run "\t" v
      }' "$out/run-$r.txt"
  done | awk -F'\t' '
    { key = $1 "\t" $2; if (!(key in seen)) { seen[key] = 1; order[++n] = key }
      vals[key] = vals[key] " " $4; cnt[key]++ }
    END {
      for (i = 1; i <= n; i++) {
        key = order[i]; split(key, kp, "\t")
        m = split(substr(vals[key], 2), a, " ")
        for (x = 1; x <= m; x++) for (y = x + 1; y <= m; y++) if (a[y] + 0 < a[x] + 0) { t = a[x]; a[x] = a[y]; a[y] = t }
        med = (m % 2) ? a[(m + 1) / 2] : (a[m / 2] + a[m / 2 + 1]) / 2
        printf "%-72s %-36s median %s\n", kp[2], substr(vals[key], 2), med
      }
    }'
} | tee "$out/summary.txt"
