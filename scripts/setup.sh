#!/usr/bin/env bash
# Installs what the build needs where it is missing (Debian/Ubuntu), then configures and builds
# (through ccache when it is installed).
# Usage: scripts/setup.sh [build-dir] [extra cmake args...]
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
shift || true

need=()
command -v cmake >/dev/null || need+=(cmake)
command -v ninja >/dev/null || need+=(ninja-build)
command -v g++ >/dev/null || need+=(g++)
if [ ${#need[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq "${need[@]}"
  else
    echo "moecomm: missing ${need[*]}; install them (cmake >= 3.25, ninja, g++ >= 11)" >&2
    exit 1
  fi
fi
if ! command -v nvcc >/dev/null; then
  for d in /usr/local/cuda/bin /usr/local/cuda-13.0/bin; do
    [ -x "$d/nvcc" ] && export PATH="$d:$PATH" && break
  done
fi
command -v nvcc >/dev/null || { echo "moecomm: nvcc (CUDA 13 toolkit) not found; install the CUDA toolkit" >&2; exit 1; }

# ccache, where installed, makes rebuilds (another build dir, the Python package's build) cheap.
# MOECOMM_NO_CCACHE=1 turns it off; launchers given on the command line win (they come later).
launchers=()
if [ -z "${MOECOMM_NO_CCACHE:-}" ] && command -v ccache >/dev/null; then
  launchers=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_CUDA_COMPILER_LAUNCHER=ccache)
fi

jobs=$(nproc)
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release "${launchers[@]}" "$@"
cmake --build "$build" -j "$jobs"
