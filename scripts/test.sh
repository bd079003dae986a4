#!/usr/bin/env bash
# Sets up, builds and runs the tests. Host tests always run; GPU tests run where a CUDA device is
# present and report "skipped: no CUDA device" elsewhere. Then the Python package is built into a
# virtual environment (build/pyenv) and its tests run (GPU ones skip without a GPU).
# Usage: scripts/test.sh [ctest args...]   (e.g. -L host, -L gpu); MOECOMM_SKIP_PYTHON=1 skips Python.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh build
(cd build && ctest --output-on-failure "$@")

if [ -z "${MOECOMM_SKIP_PYTHON:-}" ]; then
  export PATH=/usr/local/cuda/bin:$PATH
  if [ ! -x build/pyenv/bin/python ]; then
    python3 -m venv build/pyenv
  fi
  build/pyenv/bin/python -m pip install -q --upgrade pip
  build/pyenv/bin/python -m pip install -q nanobind scikit-build-core pytest numpy
  CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) build/pyenv/bin/python -m pip install -q --no-build-isolation .
  build/pyenv/bin/python -m pytest -q tests/python
fi
