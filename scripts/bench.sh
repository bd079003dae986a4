#!/usr/bin/env bash
# Sets up, builds and runs ep_bench on the local GPU (8 virtual ranks, HT and LL, standard shapes).
# Usage: scripts/bench.sh [ep_bench options...]   (ep_bench --help lists them)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh build -DMOECOMM_BUILD_TESTS=OFF >/dev/null
exec build/bench/ep_bench "$@"
