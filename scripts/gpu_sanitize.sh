#!/usr/bin/env bash
# On a GPU machine, after scripts/setup.sh: runs GPU test cases at small shapes under
# compute-sanitizer's memcheck, racecheck and synccheck, logs under $OUT (or ./gpu_logs), and
# prints one line per run: the tool, the test, its result line and the sanitizer's error count.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_logs}
mkdir -p "$out"
export PATH=/usr/local/cuda/bin:$PATH
log="$out/sanitize.log"
: >"$log"
# test binary and case filter: small shapes (the tools slow kernels down many times).
cases=(
  "test_transport|signal_and_wait_all: 40 ranks"
  "test_layout|layout on odd rank counts"
  "test_ht|HT K = 1 and K = 32"
  "test_ht|views that start off"
  "test_ll|ll: T = 0 on every rank"
  "test_ll|hidden not a multiple of 128"
  "test_ll|masked ranks: out of the group"
)
for tool in memcheck racecheck synccheck; do
  for c in "${cases[@]}"; do
    t=${c%%|*}
    f=${c#*|}
    echo "=== $tool $t '$f'" >>"$log"
    timeout ${SANITIZE_TIMEOUT:-240} compute-sanitizer --tool "$tool" --error-exitcode 99 \
      build/tests/"$t" --filter "$f" >>"$log" 2>&1
    rc=$?
    summary=$(grep -E "ERROR SUMMARY" "$log" | tail -1)
    result=$(grep -E "passed, [0-9]+ failed" "$log" | tail -1)
    echo "$tool $t '$f': ${result:-no result} | ${summary:-no summary} (rc $rc)"
  done
done
