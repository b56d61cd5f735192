#!/usr/bin/env bash
# One prepared GPU check (< 5 minutes on one GPU): the matmul peaks, then a UNITER-base
# pretraining step (MLM, token-budget batches) in bf16 - padded and packed, eager and compiled -
# as MFU against the bf16 matmul peak measured in the same run, with peak memory
# (torch.cuda.max_memory_allocated) and torch.compile's graph count. Each configuration is one
# benchmarks/bench_step.py run; one that fails or runs over CONFIG_TIMEOUT is reported and
# the others still run (a timed-out compiled run means its first compile took longer). The test suite runs it on the CPU with a tiny model (tests/test_gpu_check.py):
#   DEVICE=cpu MODEL=tiny DTYPE=fp32 BUDGET=256 COMPILE_BACKEND=aot_eager bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DEVICE=${DEVICE:-cuda}
MODEL=${MODEL:-base}
TASK=${TASK:-mlm}
DTYPE=${DTYPE:-bf16}
BUDGET=${BUDGET:-10240}
STEPS=${STEPS:-5}
WARMUP=${WARMUP:-2}
ENCODER_REPS=${ENCODER_REPS:-3}
COMPILE_BACKEND=${COMPILE_BACKEND:-inductor}
LENGTH_MULTIPLE=${LENGTH_MULTIPLE:-32}
PEAK_SIZES=${PEAK_SIZES:-}
# 30 s for the peaks + 4 x 65 s: the whole check stays under 5 minutes even when a run hangs
PEAKS_TIMEOUT=${PEAKS_TIMEOUT:-30}
CONFIG_TIMEOUT=${CONFIG_TIMEOUT:-65}
failed=0

echo "== gpu_check: $(date -u +%FT%TZ) device=$DEVICE model=$MODEL task=$TASK dtype=$DTYPE budget=$BUDGET"
$PY - <<'PY'
import torch
print(f"torch {torch.__version__}, cuda available: {torch.cuda.is_available()}"
      + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
PY
echo "== matmul peaks"
# shellcheck disable=SC2086
timeout "$PEAKS_TIMEOUT" $PY benchmarks/bench_step.py --peaks --device "$DEVICE" ${PEAK_SIZES:+--peak-sizes $PEAK_SIZES} \
  || { echo "!! matmul peaks failed (exit $?)"; failed=1; }
for varlen in never always; do
  for compile in "" "--compile"; do
    name="$([ "$varlen" = never ] && echo padded || echo packed), $([ -n "$compile" ] && echo compiled || echo eager)"
    echo "== UNITER-$MODEL $TASK step, $DTYPE, $name"
    # shellcheck disable=SC2086
    timeout "$CONFIG_TIMEOUT" $PY benchmarks/bench_step.py --model "$MODEL" --task "$TASK" --device "$DEVICE" \
      --dtype "$DTYPE" --budget "$BUDGET" --varlen "$varlen" $compile --compile-backend "$COMPILE_BACKEND" \
      --length-multiple "$LENGTH_MULTIPLE" --steps "$STEPS" --warmup "$WARMUP" --encoder-reps "$ENCODER_REPS" \
      ${PEAK_SIZES:+--peak-sizes $PEAK_SIZES} \
      || { echo "!! $name failed or timed out (exit $?)"; failed=1; }
  done
done
echo "== gpu_check done: $([ $failed = 0 ] && echo all configurations ran || echo SOME CONFIGURATIONS FAILED)"
exit $failed
