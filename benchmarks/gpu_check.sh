#!/usr/bin/env bash
# The GPU figures of docs/performance.md in one run (about 4 minutes on an H200), random weights.
#
#   benchmarks/gpu_check.sh [OUTDIR] [--quick]
#
# OUTDIR defaults to $OUT (the device tool's result folder), else runs/gpu. Without a GPU it runs
# the same steps on the CPU without --amp (use --quick there: it only checks that all steps run).
# Each step writes its own JSON, so a run cut short still returns what it finished.
set -uo pipefail
out="${1:-${OUT:-runs/gpu}}"
quick="${2:-}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"
log="$out/log.txt"
step() { echo "== [$((SECONDS))s] $*" | tee -a "$log"; "$@" 2>&1 | tee -a "$log"; }

if $py -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    device=cuda; amp=(--amp bf16); train_amp=(--amp)
else
    device=cpu; amp=(); train_amp=()
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null
  $py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
                               'cudnn', torch.backends.cudnn.version())"
  nproc; } > "$out/machine.txt" 2>&1

# 1. wide_resnet50_2 at 256 px: fp32 and bf16 autocast + channels_last, batch 1 and 64, maps
#    compared with fp32 and with the baseline, one-image latency.
step $py -m benchmarks.inference --device $device --backbones wide_resnet50_2 \
    --batch-sizes 1 64 "${amp[@]}" --channels-last --repeats 5 --min-seconds 1 \
    --json "$out/inference_wrn50.json" $quick
# 2. Training steps at batch 16 with bf16 autocast + channels_last.
step $py -m benchmarks.training --device $device --epoch-backbones --repeats 5 \
    --min-seconds 1 "${train_amp[@]}" --channels-last --json "$out/training_amp.json" $quick
# 3. The other backbones' inference, same options.
step $py -m benchmarks.inference --device $device \
    --backbones efficientnet_lite0 resnet18 resnet50 --batch-sizes 1 64 "${amp[@]}" \
    --channels-last --repeats 5 --min-seconds 1 --json "$out/inference_others.json" $quick
# 4. Training steps in float32.
step $py -m benchmarks.training --device $device --epoch-backbones --repeats 5 \
    --min-seconds 1 --json "$out/training_fp32.json" $quick
# 5. torch.compile on top, while time is left (compilation takes a minute or more).
budget="${GPU_BUDGET_S:-320}"  # seconds this whole script may take
if [ "$SECONDS" -lt $((budget - 120)) ]; then
    step timeout $((budget - SECONDS)) $py -m benchmarks.inference --device $device \
        --backbones wide_resnet50_2 --batch-sizes 64 "${amp[@]}" --channels-last --compile \
        --repeats 5 --min-seconds 1 --json "$out/inference_compile.json" $quick
fi
echo "== [$((SECONDS))s] done" | tee -a "$log"
