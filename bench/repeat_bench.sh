#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Runs backup-bench R times with the same arguments and prints, for every row that has a target
# (the ratios against the floors, the peak RSS, the keywarden --jobs speed-ups) and for the
# floors' speed-ups beside them, each run's figure and their median. On a shared machine one run can land in a slow spell of a few seconds, which
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
  [ -n "$(find "$out" -maxdepth 1 -name 'run-*.txt' 2>/dev/null)" ] || { echo "$0: no run-*.txt in $out" >&2; exit 2; }
else
  if [ $# -lt 2 ] || ! [[ $1 =~ ^[1-9][0-9]*$ ]]; then usage; fi
  rounds=$1 out=$2
  shift 2
  bench=${BACKUP_BENCH:-build/bench/backup-bench}
  [ -x "$bench" ] || { echo "$0: no $bench (build first, or set BACKUP_BENCH)" >&2; exit 2; }
  mkdir -p "$out"
  # Never mixed with the runs of another invocation.
  if [ -n "$(find "$out" -maxdepth 1 -name 'run-*.txt')" ]; then
    echo "$0: $out already holds run-*.txt files; choose another OUTDIR" >&2
    exit 2
  fi
  for ((r = 1; r <= rounds; r++)); do
    echo "run $r of $rounds: $bench $*" >&2
    "$bench" "$@" > "$out/run-$r.txt" 2>&1 || { echo "$0: run $r failed; see $out/run-$r.txt" >&2; exit 1; }
  done
fi

# Rows with a target:
#   "<name> <keys> <wall> <keys/s> <floor> <ratio> <= <target>"   (ratio against a floor)
#   "keywarden <cmd> [--jobs J] <keys> <wall> <user> <sys> <rss> <= 64" (peak RSS, MiB)
#   "<name> <keys> <1 proc s> <J procs s> <speed-up>x [rounds: ...]"  (speed-ups; with --repeat,
#   the medians of that run's rounds)
mapfile -t runs < <(find "$out" -maxdepth 1 -name 'run-*.txt' | sort -V)
{
  head -n 1 "${runs[0]}"
  echo "runs: ${#runs[@]} ($out/run-*.txt); each figure below is one run's, then the median of the runs"
  echo
  for f in "${runs[@]}"; do
    awk '
      /^keywarden .* <= 64$/ {
        name = $0; sub(/ +[0-9]+ +[0-9.]+ +[0-9.]+ +[0-9.]+ +[0-9.]+ +<= 64$/, "", name)
        if (name != $0) print "rss\t" name " peak RSS MiB (target <= 64)\t" $(NF-2)
        next
      }
      / <= [0-9.]+$/ {
        name = $0; sub(/ +[0-9]+ +[0-9.]+ +[0-9]+ +[0-9.]+ +[0-9.]+ +<= [0-9.]+$/, "", name)
        if (name != $0) print "ratio\t" name " (target <= " $NF ")\t" $(NF-2)
        next
      }
      / [0-9]+ +[0-9.]+ +[0-9.]+ +[0-9.]+x( +rounds:.*)?$/ {
        name = $0; sub(/ +[0-9]+ +[0-9.]+ +[0-9.]+ +[0-9.]+x( +rounds:.*)?$/, "", name)
        for (i = 1; i <= NF; i++) if ($i ~ /^[0-9.]+x$/) { v = $i; sub(/x$/, "", v) }
        print "speedup\t" name " --jobs speed-up" (name ~ /^keywarden/ ? " (target >= 1.7 with 2 jobs)" : "") "\t" v
      }' "$f"
  done | awk -F'\t' -v runs="${#runs[@]}" '
    { key = $1 "\t" $2; if (!(key in seen)) { seen[key] = 1; order[++n] = key }
      vals[key] = vals[key] " " $3; cnt[key]++ }
    END {
      for (i = 1; i <= n; i++) {
        key = order[i]; split(key, kp, "\t")
        m = split(substr(vals[key], 2), a, " ")
        for (x = 1; x <= m; x++) for (y = x + 1; y <= m; y++) if (a[y] + 0 < a[x] + 0) { t = a[x]; a[x] = a[y]; a[y] = t }
        med = (m % 2) ? a[(m + 1) / 2] : (a[m / 2] + a[m / 2 + 1]) / 2
        printf "%-72s %-36s median %s%s\n", kp[2], substr(vals[key], 2), med,
               (cnt[key] < runs ? " (in " cnt[key] " of " runs " runs)" : "")
      }
    }'
} | tee "$out/summary.txt"
