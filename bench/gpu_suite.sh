#!/usr/bin/env bash
# One command on a fresh GPU machine (torch + triton preinstalled, nothing installed or fetched):
#   bench/gpu_suite.sh OUT_DIR [--quick]
# builds the CUDA extension in place for this GPU's arch only, runs the GPU tests, runs every benchmark at GPU sizes
# (ops, roofline, generate, train-step, ppo-step, a profiled PPO step), and leaves at most 8 files in OUT_DIR
# (what a lent GPU machine returns):
#   suite.log                     every step with its status and seconds
#   performance.md                `saferlhf-fast bench report` of the CSVs
#   {ops,roofline,model,ppo-step}-<device>.csv   the rows to commit under bench/results/ (device name and date inside)
#   suite.tar.gz                  everything else: per-step logs, junit XML, plots, the profile (trace dropped first
#                                 if the archive would pass 15 MiB)
# On a machine without a GPU it builds the CPU extension, runs the CPU test subset and every benchmark at tiny
# sizes on the CPU instead (the GPU parts are skipped, and said so).  --quick: tiny sizes and 2 reps everywhere
# (a smoke run of the whole suite, GPU or not; the numbers mean nothing).  SUITE_SKIP_BUILD=1 / SUITE_SKIP_TESTS=1
# skip the build / the tests (a rehearsal against an already-built checkout).
# Every step is logged and time-limited (STEP_TIMEOUT seconds, default 300); a failing step does not stop the
# others; the exit status is 1 when any step failed.
set -uo pipefail
OUT=${1:?usage: bench/gpu_suite.sh OUT_DIR [--quick]}
QUICK=0
[ "${2:-}" = "--quick" ] && QUICK=1
mkdir -p "$OUT"
DEST=$(cd "$OUT" && pwd)
OUT=$(mktemp -d "${TMPDIR:-/tmp}/gpu_suite.XXXXXX")  # the work folder; DEST gets the packed result
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

if [ "${SUITE_SKIP_BUILD:-0}" = 1 ]; then log "SUITE_SKIP_BUILD=1: using the extension already built"; else
  step build env MAX_JOBS=${MAX_JOBS:-16} $PY setup.py build_ext --inplace
fi
if [ "${SUITE_SKIP_TESTS:-0}" = 1 ]; then log "SUITE_SKIP_TESTS=1: tests skipped"
elif [ "$HAS_GPU" = 1 ]; then
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
log "done in $((SECONDS - T_START)) s, status $STATUS"

# Pack: the CSVs, the report and the log stay loose; everything else goes into one archive (at most 8 files).
for f in "$OUT"/*.csv "$OUT/performance.md"; do [ -f "$f" ] && mv "$f" "$DEST/"; done
pack() { tar -czf "$DEST/suite.tar.gz" -C "$OUT" --exclude=suite.log "$@" .; }
pack
if [ "$(stat -c %s "$DEST/suite.tar.gz")" -gt $((15 * 1024 * 1024)) ]; then
  log "suite.tar.gz over 15 MiB: packed again without the profiler trace"
  pack --exclude=./profile/trace.json
fi
log "files in $DEST: $(cd "$DEST" && ls | tr '\n' ' ')"
mv "$OUT/suite.log" "$DEST/suite.log"
rm -rf "$OUT"
exit $STATUS
