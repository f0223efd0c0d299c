#!/usr/bin/env bash
# The main job on the embedded defaults: InCA on Fashion-MNIST through the offline DINOv2-S/14.
# Usage: scripts/demo.sh [venv-bin-dir]. Sized to finish within 10 minutes on 2 CPU cores.
set -euo pipefail
BIN=${1:-.venv/bin}
OUT=${INCA_DEMO_OUT:-runs/demo}
TRAIN=${INCA_DEMO_TRAIN:-2000}
TEST=${INCA_DEMO_TEST:-500}

"$BIN/inca" fit --backbone dinov2_vits14 --data fashion-mnist --layers all \
    --kinds inca,linear --lrs 1e-3,3e-3 --epochs 12 \
    --limit "$TRAIN" --test-limit "$TEST" --out "$OUT"

# A few test images as PNG files, then predict them with the saved task.
"$BIN/python" - "$OUT/samples" <<'PY'
import sys
from pathlib import Path
from inca.data import load_dataset
out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
test = load_dataset("fashion-mnist", split="test", limit=500, seed=1)
for i in range(4):
    image, label = test[i]
    image.save(out / f"test{i}_{test.classes[label].replace('/', '-').replace(' ', '_')}.png")
PY
"$BIN/inca" predict --task "$OUT/task" "$OUT"/samples/*.png
