#!/usr/bin/env bash
# Sets up, builds and runs the tests. Host tests always run; GPU tests run where a CUDA device is
# present and report "skipped: no CUDA device" elsewhere. Then the Python package is built into a
# virtual environment (build/pyenv) and its tests run: the GPU ones where there is a GPU and
# torch (from the python3 on PATH, e.g. a torch environment: the venv sees its packages), each
# skipped test listed with its reason.
# Usage: scripts/test.sh [ctest args...]   (e.g. -L host, -L gpu); MOECOMM_SKIP_PYTHON=1 skips Python;
#        MOECOMM_PYTHON=/path/to/python picks the interpreter whose torch the tests use.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh build
(cd build && ctest --output-on-failure "$@")

if [ -z "${MOECOMM_SKIP_PYTHON:-}" ]; then
  export PATH=/usr/local/cuda/bin:$PATH
  py=${MOECOMM_PYTHON:-python3}
  version() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])'; }
  # The directories of the interpreter's torch and of its other packages, if it has torch.
  torch_dirs=$("$py" - 2>/dev/null <<'EOF' || true
import os, sysconfig, torch
paths = sysconfig.get_paths()
for d in dict.fromkeys([os.path.dirname(os.path.dirname(torch.__file__)), paths["purelib"],
                        paths["platlib"]]):
    print(d)
EOF
)
  if [ -x build/pyenv/bin/python ] && [ "$(version build/pyenv/bin/python)" != "$(version "$py")" ]; then
    rm -rf build/pyenv  # made by another Python: its packages would not load here
  fi
  [ -x build/pyenv/bin/python ] || "$py" -m venv build/pyenv
  site=$(build/pyenv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  # A .pth file puts the torch environment's packages after the venv's own: torch (and numpy,
  # pytest where it has them) come from there, moecomm from the venv.
  if [ -n "$torch_dirs" ]; then
    printf '%s\n' "$torch_dirs" >"$site/moecomm-torch-env.pth"
  else
    rm -f "$site/moecomm-torch-env.pth"
  fi
  # Only what is missing is installed (a torch environment may bring them all, and a machine
  # without network can then still run this).
  if ! build/pyenv/bin/python -c "import nanobind, scikit_build_core, pytest, numpy" 2>/dev/null; then
    build/pyenv/bin/python -m pip install -q --upgrade pip
    build/pyenv/bin/python -m pip install -q nanobind scikit-build-core pytest numpy
  fi
  if command -v ccache >/dev/null && [ -z "${MOECOMM_NO_CCACHE:-}" ]; then
    export CMAKE_ARGS="${CMAKE_ARGS:-} -DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_CUDA_COMPILER_LAUNCHER=ccache"
  fi
  CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) build/pyenv/bin/python -m pip install -q --no-build-isolation .

  echo "== Python tests with build/pyenv (Python $(version build/pyenv/bin/python), made from $py)"
  build/pyenv/bin/python - <<'EOF'
import moecomm
try:
    import torch
    gpu = torch.cuda.is_available() and moecomm.cuda_device_count() > 0
    print(f"   torch {torch.__version__} from {torch.__file__.rsplit('/', 2)[0]}; "
          + ("a CUDA device is present: test_gpu.py runs" if gpu
             else "no CUDA device: test_gpu.py skips"))
except ImportError:
    print(f"   torch: not importable with this interpreter: test_gpu.py skips "
          f"(set MOECOMM_PYTHON to a python that has torch)")
EOF
  rc=0
  build/pyenv/bin/python -m pytest -v -rs tests/python || rc=$?
  [ "$rc" = 5 ] && rc=0  # no test collected: nothing failed
  exit "$rc"
fi
