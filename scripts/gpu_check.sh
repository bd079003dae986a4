#!/usr/bin/env bash
# On a GPU machine: build with every core, run the GPU tests and the benchmark, keep the logs
# under $OUT (or ./gpu_logs), and print a short summary last.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_logs}
mkdir -p "$out"
export PATH=/usr/local/cuda/bin:$PATH
summary=()
start=$(date +%s)

nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version --format=csv,noheader >"$out/gpu.txt" 2>&1
# Keep going past a target that fails so that the others still run; the summary says so.
if scripts/setup.sh build >"$out/build.log" 2>&1; then
  summary+=("build ok ($(( $(date +%s) - start )) s)")
else
  cmake --build build -j "$(nproc)" -- -k 0 >>"$out/build.log" 2>&1
  grep -E "error|FAILED" "$out/build.log" | head -20
  summary+=("build FAILED for some targets (see build.log)")
fi

for t in ${GPU_TESTS:-test_gpu_numerics test_transport test_rdma_engine test_layout test_ht test_ll test_internode_ht test_internode_ll test_api test_soak test_gin_engine}; do
  if [ -x build/tests/$t ]; then
    timeout ${TEST_TIMEOUT:-300} build/tests/$t ${TEST_ARGS:-} >"$out/$t.log" 2>&1
    rc=$?
    summary+=("$t: $(tail -1 "$out/$t.log") (rc $rc)")
    [ $rc -ne 0 ] && grep -E "FAIL|error|Error" "$out/$t.log" | head -15
  fi
done

# Separate processes on one GPU: under MPS their kernels are resident together (without it they
# time-slice and every cross-process wait costs milliseconds). Started here, stopped right after.
if [ -x build/tests/test_process_group ] && [ -z "${SKIP_PROCESS_TEST:-}" ]; then
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/moecomm-mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/moecomm-mps-log
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  mps=""
  nvidia-cuda-mps-control -d 2>/dev/null && mps=" under MPS"
  # The case of four processes declared as nodes runs without MPS: on the H200 (driver 580) the
  # fourth MPS client's first cudaMalloc fails (out of memory, for a 0.5 MB buffer); its waits
  # are short enough for time-sliced processes.
  nodes_case="declared as nodes (2x1, 2x2)"
  timeout 180 build/tests/test_process_group --exclude "$nodes_case" >"$out/test_process_group.log" 2>&1
  rc=$?
  [ -n "$mps" ] && echo quit | nvidia-cuda-mps-control
  unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
  summary+=("test_process_group$mps: $(tail -1 "$out/test_process_group.log") (rc $rc)")
  [ $rc -ne 0 ] && tail -15 "$out/test_process_group.log"
  timeout 180 build/tests/test_process_group --filter "$nodes_case" >"$out/test_process_group_nodes.log" 2>&1
  rc=$?
  summary+=("test_process_group (processes as nodes, no MPS): $(tail -1 "$out/test_process_group_nodes.log") (rc $rc)")
  [ $rc -ne 0 ] && tail -15 "$out/test_process_group_nodes.log"
fi

if [ -z "${SKIP_BENCH:-}" ] && [ -x build/bench/ep_bench ]; then
  timeout ${BENCH_TIMEOUT:-240} build/bench/ep_bench --json "$out/bench.json" ${BENCH_ARGS:-} >"$out/bench.log" 2>&1
  rc=$?
  tail -30 "$out/bench.log"
  summary+=("ep_bench rc $rc")
fi

# Before/after: the same ep_bench run on the library of commit $BASELINE (e.g. BASELINE=8d0c660),
# built from that commit's tree in /tmp (bench only), so that both figures come from one machine.
if [ -z "${SKIP_BENCH:-}" ] && [ -n "${BASELINE:-}" ]; then
  base=/tmp/moecomm-baseline
  rm -rf "$base" && mkdir -p "$base"
  # BASELINE_TAR: that commit's `git archive` carried along, where the clone lacks the commit.
  if { if [ -n "${BASELINE_TAR:-}" ]; then tar -xf "$BASELINE_TAR" -C "$base"; else git archive "$BASELINE" | tar -x -C "$base"; fi; } &&
     cmake -S "$base" -B "$base/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
       -DMOECOMM_BUILD_TESTS=OFF >"$out/baseline_build.log" 2>&1 &&
     cmake --build "$base/build" -j "$(nproc)" --target ep_bench >>"$out/baseline_build.log" 2>&1; then
    timeout ${BENCH_TIMEOUT:-240} "$base/build/bench/ep_bench" --json "$out/bench_baseline.json" \
      ${BENCH_ARGS:-} >"$out/bench_baseline.log" 2>&1
    rc=$?
    echo "== ep_bench of $BASELINE (baseline, same machine):"
    tail -30 "$out/bench_baseline.log"
    summary+=("ep_bench baseline $BASELINE rc $rc")
  else
    tail -5 "$out/baseline_build.log"
    summary+=("baseline $BASELINE: build FAILED")
  fi
fi

# INTERNODE=1: the 2 virtual nodes x 4 ranks figures (#12), with the default NIC model and with it
# effectively off (what the kernels alone cost on the one GPU). INTERNODE_BIN: another ep_bench.
if [ -z "${SKIP_BENCH:-}" ] && [ -n "${INTERNODE:-}" ]; then
  ib=${INTERNODE_BIN:-build/bench/ep_bench}
  tag=${INTERNODE_TAG:-internode}
  for m in ht ll; do
    extra=""; [ $m = ll ] && extra="--graph --iters 30"
    timeout ${BENCH_TIMEOUT:-240} $ib --ranks 8 --nodes 2 --mode $m --iters 20 --warmup 3 $extra \
      --json "$out/${tag}_$m.json" >"$out/${tag}_$m.log" 2>&1
    rc1=$?
    timeout ${BENCH_TIMEOUT:-240} $ib --ranks 8 --nodes 2 --mode $m --iters 20 --warmup 3 $extra \
      --nic-gbps 100000 --nic-latency-us 0 >"$out/${tag}_${m}_nicoff.log" 2>&1
    rc2=$?
    echo "== $tag $m (NIC model on, then off):"
    grep -E "^(ht|ll) " "$out/${tag}_$m.log" | head -12
    grep -E "^(ht|ll) " "$out/${tag}_${m}_nicoff.log" | head -12
    summary+=("$tag $m rc $rc1/$rc2")
  done
fi

# The front-end floor under every plain-launch figure (docs/bench.md).
if [ -z "${SKIP_BENCH:-}" ] && [ -x build/bench/launch_floor ]; then
  timeout 120 build/bench/launch_floor >"$out/launch_floor.log" 2>&1
  summary+=("launch_floor rc $? (launch_floor.log)")
fi

# The memory rate of dispatch's and combine's traffic mixes, over SM counts (docs/bench.md).
if [ -z "${SKIP_BENCH:-}" ] && [ -x build/bench/hbm_mix ]; then
  timeout 120 build/bench/hbm_mix >"$out/hbm_mix.log" 2>&1
  summary+=("hbm_mix rc $? (hbm_mix.log)")
fi

# Optional second ep_bench run (e.g. SWEEP_ARGS="--mode both --sweep tokens --graph").
if [ -n "${SWEEP_ARGS:-}" ] && [ -x build/bench/ep_bench ]; then
  timeout ${BENCH_TIMEOUT:-240} build/bench/ep_bench --json "$out/sweep.json" $SWEEP_ARGS >"$out/sweep.log" 2>&1
  rc=$?
  grep -E "^(ht|ll) " "$out/sweep.log" | tail -40
  summary+=("ep_bench sweep rc $rc")
fi

# MPI_BENCH="2 4": ep_bench with one process per rank (mpirun -np N) on this one GPU, under MPS
# (processes' kernels resident together), for each N; with N even also --nodes 2 (processes
# declared as two nodes: the loopback engine between them). MPI_BENCH_ARGS: extra options.
if [ -n "${MPI_BENCH:-}" ] && [ -x build/bench/ep_bench ]; then
  if ! grep -q "mpirun mode: ON" "$out/build.log" && ! grep -q "MOECOMM_BENCH_WITH_MPI" build/build.ninja; then
    summary+=("MPI_BENCH: ep_bench built without MPI (no MPI development files found)")
  else
    export CUDA_MPS_PIPE_DIRECTORY=/tmp/moecomm-mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/moecomm-mps-log
    mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
    nvidia-cuda-mps-control -d 2>/dev/null
    for n in $MPI_BENCH; do
      for nodes in 1 2; do
        [ $nodes = 2 ] && [ $((n % 2)) != 0 ] && continue
        tag=bench_mpi_np${n}_nodes${nodes}
        timeout ${BENCH_TIMEOUT:-240} mpirun --allow-run-as-root --oversubscribe -np $n \
          build/bench/ep_bench --nodes $nodes --iters 20 --json "$out/$tag.json" ${MPI_BENCH_ARGS:-} \
          >"$out/$tag.log" 2>&1
        rc=$?
        echo "== mpirun -np $n ep_bench --nodes $nodes (rc $rc):"
        grep -E "^(ht|ll) |^note|error|failed" "$out/$tag.log" | head -16
        summary+=("mpirun -np $n ep_bench --nodes $nodes rc $rc")
      done
    done
    echo quit | nvidia-cuda-mps-control
    unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
  fi
fi

# Python package: build it (no network there: no build isolation) and run its tests.
if [ -n "${RUN_PYTHON:-}" ]; then
  if CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) python3 -m pip install -q --upgrade --no-build-isolation --no-deps \
      --target /tmp/moecomm-py . >"$out/python_build.log" 2>&1; then
    PYTHONPATH=/tmp/moecomm-py PYTHONUNBUFFERED=1 timeout ${PY_TIMEOUT:-300} \
      python3 -m pytest -q ${PYTEST_TARGET:-tests/python} ${PYTEST_ARGS:-} >"$out/pytest.log" 2>&1
    summary+=("pytest: $(tail -1 "$out/pytest.log")")
    grep -E "FAILED|Error" "$out/pytest.log" | head -10
  else
    tail -20 "$out/python_build.log"
    summary+=("python build FAILED")
  fi
fi

# The commit, and whether the tree that ran differs from it (a copied tree may carry a stale .git).
tree=$(git rev-parse --short HEAD 2>/dev/null)
[ -n "$tree" ] && ! git diff --quiet HEAD 2>/dev/null && tree="$tree, the tree differs from it"
echo "== SUMMARY ($(cat "$out/gpu.txt"); ${tree:-no git})"
for s in "${summary[@]}"; do echo "  $s"; done
