#!/usr/bin/env bash
# The GPU check, in one call: the `cuda` tests, then the benchmark tables, within GPU_CHECK_BUDGET
# seconds (default 460) on one H100/H200. For a GPU machine whose python3 has torch + triton and no
# network:
#   bash benchmarks/gpu_check.sh                          # every step, in order, within the budget
#   bash benchmarks/gpu_check.sh build tests bench_loss   # only these steps
# Tables go to benchmarks/results/, logs to benchmarks/results/logs/; with $OUT set, all of it also
# comes back as $OUT/gpu_check.tgz.
# Optional wheels (the peers' rows: Liger-Kernel, Cut Cross-Entropy, TRL) are installed from .whl/
# when present; benchmarks/fetch_wheels.sh downloads them on a machine with network.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOG_DIR=benchmarks/results/logs
mkdir -p "$LOG_DIR"
status=0

steps=" ${*:-build tests bench_loss bench_head bench_swap bench_e2e bench_packing} "
# The whole script stays inside one device call of 8 minutes: each step gets at most what is left
# of GPU_CHECK_BUDGET seconds (a step cut short still leaves its log; the later ones are skipped).
# The per-step limits below are ceilings that add up to more than the budget, not expected times.
BUDGET=${GPU_CHECK_BUDGET:-460}
step() {  # step NAME SECONDS COMMAND...: run with a time limit, keep going on failure
  local name=$1 limit=$2; shift 2
  [[ $steps == *" $name "* ]] || return 0
  local left=$((BUDGET - SECONDS))
  if [ "$left" -lt 20 ]; then
    echo "=== $name: skipped, ${left}s left of the ${BUDGET}s budget ==="; status=1; return 0
  fi
  [ "$limit" -le "$left" ] || limit=$left
  echo "=== $name (limit ${limit}s) ==="
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$LOG_DIR/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc in $((SECONDS - t0))s ==="
  [ "$rc" = 0 ] || status=1
}

if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD:$PWD/python${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

step build 120 $PY setup.py build_ext --inplace
# The `cuda` tests include the first-step check: bf16 runs with either head start each iteration
# with a margin of exactly 0 (tests/test_train_head.py), seconds on an H200.
step tests 210 $PY -m pytest -q -m cuda tests -p no:cacheprovider --durations=8
step bench_loss 170 $PY benchmarks/bench_loss.py ${LOSS_SWEEP:+--sweep}  # LOSS_SWEEP=1: re-tune launch configs
step bench_head 180 $PY benchmarks/bench_head.py  # 3 shapes x 6 rows; Liger's torch.compile per shape
step bench_swap 100 $PY benchmarks/bench_swap.py
step bench_e2e 150 $PY benchmarks/bench_e2e.py
# Packed prompt-sharing pairs against padded ones (tokens per pair, step time and peak memory).
step bench_packing 60 $PY benchmarks/bench_packing.py --out benchmarks/results/packing
[ -n "${OUT:-}" ] && tar czf "$OUT/gpu_check.tgz" benchmarks/results
for name in $steps; do
  f=benchmarks/results/${name#bench_}.md
  [ -f "$f" ] && { echo "----- $f"; cat "$f"; }
done
exit $status
