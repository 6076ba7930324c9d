#!/usr/bin/env bash
# One command on a fresh GPU machine (torch + triton preinstalled, nothing fetched):
#   bench/gpu_suite.sh OUT_DIR [--quick]
# builds the CUDA extension in place, runs the GPU tests, runs every benchmark at GPU sizes (ops, roofline,
# generate, train-step, ppo-step, a profiled PPO step), and writes CSV + PNG + markdown + logs into OUT_DIR:
#   suite.log, <step>.log, tests*.xml, {ops,roofline,model,ppo-step}-<device>.csv, plots/*.png,
#   performance.md (`saferlhf-fast bench report` of the CSVs), profile/{trace.json,profile.md,phases.csv,kernels.csv}
# On a machine without a GPU it builds the CPU extension, runs the CPU test subset and every benchmark at tiny
# sizes on the CPU instead (the GPU parts are skipped, and said so).  --quick: tiny sizes and 2 reps everywhere
# (a smoke run of the whole suite, GPU or not; the numbers mean nothing).
# Every step is logged and time-limited (STEP_TIMEOUT seconds, default 300); a failing step does not stop the
# others; the exit status is 1 when any step failed.
set -uo pipefail
OUT=${1:?usage: bench/gpu_suite.sh OUT_DIR [--quick]}
QUICK=0
[ "${2:-}" = "--quick" ] && QUICK=1
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
STATUS=0
STEP_TIMEOUT=${STEP_TIMEOUT:-300}
T_START=$SECONDS
log() { echo "[gpu_suite $(date -u +%H:%M:%S)] $*" | tee -a "$OUT/suite.log"; }
step() {  # step NAME CMD...: run under a time limit, log to OUT/NAME.log, remember failures, keep going
  local name=$1; shift
  log "start $name: $*"
  local t0=$SECONDS
  if timeout "$STEP_TIMEOUT" "$@" >"$OUT/$name.log" 2>&1; then
    log "ok    $name ($((SECONDS - t0)) s)"
  else
    log "FAIL  $name ($((SECONDS - t0)) s, status $?), see $name.log"; STATUS=1
  fi
}

HAS_GPU=$($PY -c "import torch; print(int(torch.cuda.is_available()))")
$PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/suite.log"
if [ "$HAS_GPU" = 1 ]; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee -a "$OUT/suite.log"
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
  DEVICE=cuda; SIZES=gpu; REPS=5
else
  log "no GPU: building the CPU extension, CPU tests and tiny CPU benchmarks only (GPU parts skipped)"
  export SAFERLHF_NO_CUDA=1
  DEVICE=cpu; SIZES=tiny; REPS=3
fi
[ "$QUICK" = 1 ] && { SIZES=tiny; REPS=2; log "--quick: tiny sizes, $REPS reps"; }
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
CLI=($PY -m saferlhf_fast.cli)

step build env MAX_JOBS=${MAX_JOBS:-16} $PY setup.py build_ext --inplace
if [ "$HAS_GPU" = 1 ]; then
  step tests_gpu $PY -m pytest -q tests -m gpu --junitxml="$OUT/tests_gpu.xml"
  step tests_kernels $PY -m pytest -q tests/test_triton_kernels.py tests/test_ops.py tests/test_bench_cli.py \
    -m "not slow" --junitxml="$OUT/tests_kernels.xml"
else
  step tests $PY -m pytest -q tests/test_ops.py tests/test_lagrange.py tests/test_bench.py tests/test_bench_cli.py \
    -m "not slow" --junitxml="$OUT/tests.xml"
fi
B=(--device "$DEVICE" --sizes "$SIZES" --reps "$REPS" --overwrite)
step bench_ops "${CLI[@]}" bench ops "${B[@]}" --warmup 1 --csv "$OUT/ops-$DEVICE.csv"
step roofline "${CLI[@]}" bench roofline "${B[@]}" --csv "$OUT/roofline-$DEVICE.csv"
step bench_generate "${CLI[@]}" bench generate "${B[@]}" --csv "$OUT/model-$DEVICE.csv"
# train-step appends to the generate rows (same CSV)
step bench_train_step "${CLI[@]}" bench train-step --device "$DEVICE" --sizes "$SIZES" --reps "$REPS" \
  --csv "$OUT/model-$DEVICE.csv"
step bench_ppo_step "${CLI[@]}" bench ppo-step "${B[@]}" --csv "$OUT/ppo-step-$DEVICE.csv" --json "$OUT/ppo-step-$DEVICE.json"
step profile "${CLI[@]}" profile ppo-step --device "$DEVICE" --sizes "$SIZES" --out "$OUT/profile"
CSVS=()
for f in ops roofline model ppo-step; do [ -s "$OUT/$f-$DEVICE.csv" ] && CSVS+=("$OUT/$f-$DEVICE.csv"); done
if [ ${#CSVS[@]} -gt 0 ]; then
  step plots "${CLI[@]}" bench plot --csv "${CSVS[@]}" --out "$OUT/plots"
  step report sh -c "$(printf '%q ' "${CLI[@]}") bench report --csv $(printf '%q ' "${CSVS[@]}") > $(printf '%q' "$OUT/performance.md")"
fi
log "done in $((SECONDS - T_START)) s, status $STATUS; files in $OUT"
exit $STATUS
