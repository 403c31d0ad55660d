#!/usr/bin/env bash
# The checks that need a GPU, in one run of about 9 minutes on one GPU: the CUDA tests, then the GPU runs of
# bench_parse, bench_train, bench_decode and bench_scst's step cost. Every line goes to the log; the RESULT lines are repeated at the end.
#
#     bash benchmarks/gpu_check.sh                  # log: $OUT/gpu_check.log if OUT is set, else runs/gpu_check.log
#     PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh
#
# It installs nothing: it runs on the Python that holds the project's requirements (default: python3).
# Each step has a time limit, so one slow step cannot stop the others; a failed step is reported and the
# script exits non-zero at the end.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LOG_DIR=${OUT:-runs}
mkdir -p "$LOG_DIR"
LOG="$LOG_DIR/gpu_check.log"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
# The project is importable from this checkout even where it is not installed into $PYTHON (make install does that).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
: > "$LOG"
failed=()

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  local status=${PIPESTATUS[0]}
  echo "=== $name: exit $status after $((SECONDS - start))s" | tee -a "$LOG"
  [ "$status" -eq 0 ] || failed+=("$name")
}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || echo "nvidia-smi: none"
  "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
} 2>&1 | tee -a "$LOG"

step tests 120 "$PYTHON" -m pytest -q tests/test_train_cuda.py
step bench_parse 150 "$PYTHON" benchmarks/bench_parse.py --device cuda --images 512
step bench_train 120 "$PYTHON" benchmarks/bench_train.py --device cuda --also bf16
step bench_decode 90 "$PYTHON" benchmarks/bench_decode.py --device cuda --with_generate
step bench_scst 90 "$PYTHON" benchmarks/bench_scst.py --device cuda --skip_arms

echo "=== RESULT lines" | tee -a "$LOG"
for name in bench_parse bench_train bench_decode bench_scst; do
  line=$(awk -v n="=== $name (" 'index($0, n) == 1 {on = 1; next} /^=== / {on = 0} on && /^RESULT /' "$LOG" | tail -1)
  echo "$name: ${line:-RESULT missing}" | tee -a "$LOG"
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "failed: ${failed[*]} (see $LOG)" | tee -a "$LOG"
  exit 1
fi
echo "all GPU checks passed (log: $LOG)" | tee -a "$LOG"
