#!/usr/bin/env bash
# Speed and memory of dragondiff on a CUDA machine, with SD1.5's full-size UNet and VAE (random weights: compute
# does not depend on weight values), fp16, at 512 and 768 px: seconds per edit (first edit = inversion + edit;
# later edit = the same inversion reused), forward-equivalents, pass counts and peak GPU memory, for each task and
# preset. Needs diffusers and transformers importable and this repository's src/ (or dragondiff installed).
#   bash benchmarks/gpu_check.sh                      # everything: 5 tasks x 3 presets x 2 sizes (about 7 minutes on an H100)
#   TASKS="move appearance" PRESETS="official fast" bash benchmarks/gpu_check.sh   # a shorter run
# Output: a table per size on stdout, JSON in ${OUT:-out/bench}/speed-gpu-<size>.json.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD/src" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
TASKS=${TASKS:-move resize drag appearance paste}
PRESETS=${PRESETS:-official paper fast}
SIZES=${SIZES:-512 768}
DEST=${OUT:-out/bench}
mkdir -p "$DEST"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
for size in $SIZES; do
  python3 -m dragondiff bench speed --model sd15-shaped --device cuda --dtype float16 --size "$size" \
    --tasks $TASKS --presets $PRESETS --out "$DEST/speed-gpu-$size.json"
done
