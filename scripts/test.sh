#!/usr/bin/env bash
# Sets up, builds and runs the tests. Host tests always run; GPU tests run where a CUDA device is
# present and report "skipped: no CUDA device" elsewhere.
# Usage: scripts/test.sh [ctest args...]   (e.g. -L host, -L gpu)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh build
cd build
ctest --output-on-failure "$@"
