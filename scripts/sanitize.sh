#!/usr/bin/env bash
# The host code and its tests under AddressSanitizer and UndefinedBehaviorSanitizer, in their own
# build dir (build-sanitize): the reference, Config (validation, config files), tensor-view
# checks, the process-group config digest and buffer layout, with the host tests that cover them
# and the bounded fuzz run (fuzz_host). No CUDA code is built there. Any sanitizer report fails.
# Usage: scripts/sanitize.sh [ctest args...]   MOECOMM_FUZZ_CASES=N sets the fuzz cases per target.
set -euo pipefail
cd "$(dirname "$0")/.."
build=build-sanitize
scripts/setup.sh "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMOECOMM_SANITIZE=address,undefined \
  -DMOECOMM_FUZZ_CASES="${MOECOMM_FUZZ_CASES:-10000}"
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:detect_stack_use_after_return=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
(cd "$build" && ctest --output-on-failure "$@")
# What the fuzz run covered (seed, cases per target), from ctest's log.
sed -n '/^fuzz_host: up to/,/^[0-9]* passed/p' "$build/Testing/Temporary/LastTest.log" |
  grep -E "^fuzz_host|^seed|cases|passed" || true
