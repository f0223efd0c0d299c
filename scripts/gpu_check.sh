#!/usr/bin/env bash
# The whole GPU check as one command (issue 18): the CUDA tests, InCA's speed and memory
# against the plain forward and bf16 full fine-tuning, bf16 against float32 quality, the
# CLI on CUDA, ViT-g, and torchrun ranks on the GPU. Each stage runs under its own
# `timeout -k 15 <cap>`, appends its output to $OUT/log.txt and writes its results into
# $OUT as it goes (a stage killed later loses nothing before it); $OUT/stages.txt gets one
# line per stage: its rc (124: it hit its cap) or why it was skipped. A stage is skipped
# when less than its cap is left of BUDGET seconds.
#
# 1. Prepare, here on a CPU, once (needs the offline assets `make assets` installs):
#        .venv/bin/python benchmarks/gpu_quality.py --prepare --train 20000 --test 10000
#    It writes .bench-assets/ (git-ignored; 54.7 MiB: the DINOv2-S/14 weights in fp16,
#    42.1 MiB, and Fashion-MNIST 20,000 train + 10,000 test as an npz, 12.6 MiB), which
#    with the tracked tree stays under the device tool's 64 MiB. Leave no other large
#    untracked, non-ignored files in the checkout: they travel too.
# 2. Run it on the GPU machine with the device tool, carrying the assets, as one call:
#        run(command="COMMIT=<sha> bash scripts/gpu_check.sh", carry=[".bench-assets"],
#            timeout_s=570)
#    The machine has torch, timm, transformers, safetensors, typer, tqdm, numpy,
#    scikit-learn and pytest but not inca: PYTHONPATH=src is set here. $OUT is set by the
#    tool and comes back; hand the machine back afterwards unless a rerun follows.
# 3. Commit what came back under benchmarks/results/: gpu.{json,md},
#    gpu-quality.{json,md}, gpu-giant.{json,md}, distributed-cuda.{json,md},
#    cuda-tests.{log,xml}, cli-fit-report.{json,md}, log.txt.
#
# Usage: [OUT=folder] [BUDGET=seconds] [CAPS="c0 ... c6"] [PY=python] [COMMIT=sha] \
#            bash scripts/gpu_check.sh [--quick]
#   --quick  the same stages on the CPU with tiny models and sizes (the test suite runs it
#            so that this script cannot rot; it prepares its own tiny assets).
# Expected on an H200 (no GPU has run it yet; estimates from the review): stage 0 5 s,
# 1 50 s, 2 120 s, 3 165 s, 4 25 s, 5 60 s, 6 45 s: about 8 minutes, at most BUDGET.
set -u

QUICK=0
case "${1:-}" in
  --quick) QUICK=1 ;;
  "") ;;
  *) echo "usage: [OUT=folder] bash scripts/gpu_check.sh [--quick]" >&2; exit 2 ;;
esac

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
OUT=${OUT:-/tmp/inca-gpu-check-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
PY=${PY:-$(command -v python || command -v python3)}
WORK=$(mktemp -d /tmp/inca-gpu-check-work.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
LOG=$OUT/log.txt
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export OUT PY WORK QUICK

# BUDGET: seconds for all stages; CAPS: each stage's cap in seconds, stages 0 to 6
if (( QUICK )); then
  BUDGET=${BUDGET:-1800}
  read -r -a CAPS <<< "${CAPS:-300 300 300 300 300 300 300}"  # a loaded CPU: skip none
  TINY='{"depth": 2, "embed_dim": 32, "num_heads": 2, "patch_size": 8}'
  DEVICE=cpu
else
  BUDGET=${BUDGET:-540}
  read -r -a CAPS <<< "${CAPS:-30 100 170 200 60 90 90}"
  DEVICE=cuda
fi
START=$SECONDS

log() { echo "$*" | tee -a "$LOG"; }

# stage NUMBER NAME COMMAND: run COMMAND (a bash command line) under its cap, or skip it.
stage() {
  local num=$1 name=$2 cmd=$3 cap=${CAPS[$1]}
  local left=$(( BUDGET - (SECONDS - START) ))
  if (( left < cap )); then
    log "=== stage $num $name: skipped, ${left} s left < its cap ${cap} s"
    echo "$num $name skipped (${left} s left < cap ${cap} s)" >> "$OUT/stages.txt"
    return 0
  fi
  log "=== stage $num $name (cap ${cap} s, ${left} s left)"
  echo "$cmd" >> "$LOG"
  local t0=$SECONDS
  timeout -k 15 "$cap" bash -c "$cmd" >> "$LOG" 2>&1
  local rc=$?
  log "=== stage $num $name: rc=$rc ($(( SECONDS - t0 )) s)"
  echo "$num $name rc=$rc $(( SECONDS - t0 ))s" >> "$OUT/stages.txt"
}

COMMIT=${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo "unknown: pass COMMIT=...")}
log "gpu_check: $(date -u +%FT%TZ), commit $COMMIT, quick=$QUICK, budget ${BUDGET} s, out $OUT"

# 0: the machine: GPU, memory, disk and /dev/shm (small: DataLoader workers die), versions
stage 0 machine '
nvidia-smi || echo "nvidia-smi: not available"
free -g; df -h /tmp /dev/shm "$PWD"; nproc
echo "python: $PY"
"$PY" - <<"EOF"
import importlib, sys
import torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "devices", torch.cuda.device_count())
for i in range(torch.cuda.device_count()):
    free, total = torch.cuda.mem_get_info(i)
    print(f"cuda:{i}", torch.cuda.get_device_name(i), f"free {free / 2**30:.1f} GiB of "
          f"{total / 2**30:.1f}", "bf16", torch.cuda.is_bf16_supported())
for name in ("timm", "transformers", "peft", "safetensors", "typer", "tqdm", "numpy",
             "sklearn", "PIL", "torchvision", "pytest", "pytest_timeout", "fastapi"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except ImportError:
        print(name, "missing")
from timm.layers import use_fused_attn
print("timm fused attention:", use_fused_attn())
from torch.distributed.utils import _recursive_to
from inca.training.sources import StackedFeats
moved = _recursive_to((StackedFeats(torch.zeros(2, 1, 3, 4), ["a", "b"]),),
                      torch.device("meta"), False)[0]
moved = moved[0] if isinstance(moved, tuple) else moved
print("StackedFeats survives DDP moving its inputs:", type(moved).__name__ == "StackedFeats")
import inca
print("inca", inca.__version__, "from", inca.__file__)
EOF'

# 1: the cuda tests (they skip themselves without a GPU)
TIMEOUT_OPT=""
"$PY" -c "import pytest_timeout" 2>/dev/null && TIMEOUT_OPT="--timeout 80"
stage 1 cuda-tests "
\"\$PY\" -m pytest tests/test_precision.py -m cuda -o addopts= -p no:cacheprovider -q -rA \
  $TIMEOUT_OPT --junitxml=\"\$OUT/cuda-tests.xml\" 2>&1 | tee \"\$OUT/cuda-tests.log\"
exit \${PIPESTATUS[0]}"

# 2: speed and memory, ViT-B/16 and ViT-L/16, then end to end at 4,000 and 16,000 images
if (( QUICK )); then
  stage 2 gpu "\"\$PY\" benchmarks/gpu.py --device cpu --models vit_tiny_patch16_224 \
--batch-sizes 4 --input-size 32 --model-kwargs '$TINY' --steps 1 --giant none \
--e2e-sizes 32,48 --e2e-batch 16 --epochs 1 --e2e-mode streaming --results-dir \"\$OUT\""
else
  stage 2 gpu '"$PY" benchmarks/gpu.py --device cuda --steps 20 --giant none \
--e2e-sizes 4000,16000 --e2e-mode streaming --results-dir "$OUT"'
fi

# 3: quality, bf16-mixed against float32 (DINOv2-S/14, 224 px, Fashion-MNIST 20,000 /
# 10,000), InCA and full fine-tuning; then InCA's design axes at full's training time
if (( QUICK )); then
  stage 3 gpu-quality '"$PY" benchmarks/gpu_quality.py --prepare --assets "$WORK/assets" \
--train 48 --test 24 && "$PY" benchmarks/gpu_quality.py --assets "$WORK/assets" \
--device cpu --input-size 28 --epochs 1 --batch-size 16 --num-workers 0 --layers 10,11 \
--test 24 --precisions bf16-mixed,32 --methods inca,full,axes --axes-max-epochs 1 \
--results-dir "$OUT"'
else
  stage 3 gpu-quality '"$PY" benchmarks/gpu_quality.py --device cuda --epochs 3 \
--train 20000 --test 10000 --precisions bf16-mixed,32 --methods inca,full,axes \
--results-dir "$OUT"'
fi

# 4: the user's path: inca fit through the CLI on CUDA with a bf16 backbone (mode auto)
if (( QUICK )); then
  CLI_ARGS="--backbone timm:vit_tiny_patch16_224 --input-size 32 --limit 64 --test-limit 32 --epochs 1 --num-workers 0"
else
  CLI_ARGS="--backbone timm:vit_small_patch16_224 --limit 800 --epochs 10"
fi
stage 4 cli-fit "
\"\$PY\" -m inca fit $CLI_ARGS --no-pretrained --data digits --device $DEVICE \
  --backbone-dtype bfloat16 --out \"\$WORK/cli-run\" || exit \$?
cp \"\$WORK/cli-run/report.json\" \"\$OUT/cli-fit-report.json\"
cp \"\$WORK/cli-run/report.md\" \"\$OUT/cli-fit-report.md\""

# 5: ViT-g: the bank over all 40 blocks on one GPU, beside a measured fine-tuning step
if (( QUICK )); then
  stage 5 gpu-giant "\"\$PY\" benchmarks/gpu.py --device cpu --models '' \
--giant vit_small_patch14_dinov2 --giant-batch 2 --input-size 28 --model-kwargs '{\"depth\": 2}' \
--steps 1 --e2e-sizes '' --name gpu-giant --results-dir \"\$OUT\""
else
  stage 5 gpu-giant '"$PY" benchmarks/gpu.py --device cuda --models "" \
--giant vit_giant_patch14_dinov2 --giant-batch 32 --steps 10 --e2e-sizes "" \
--name gpu-giant --results-dir "$OUT"'
fi

# 6: torchrun, 1 and 2 ranks sharing the GPU over Gloo, random weights (no large assets)
if (( QUICK )); then
  stage 6 distributed '"$PY" benchmarks/distributed.py --device cpu --ranks 1,2 \
--random-weights --data digits --images 48 --epochs 1 --input-size 28 \
--name distributed-cuda --time-limit 280 --results-dir "$OUT"'
else
  stage 6 distributed '"$PY" benchmarks/distributed.py --device cuda --ranks 1,2 \
--random-weights --data digits --time-limit 80 --results-dir "$OUT"'
fi

log "gpu_check: done in $(( SECONDS - START )) s; stages:"
tee -a "$LOG" < "$OUT/stages.txt"
