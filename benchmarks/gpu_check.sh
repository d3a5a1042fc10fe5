#!/usr/bin/env bash
# Speed and memory of dragondiff on a CUDA machine, with SD1.5's full-size UNet and VAE (random weights: compute
# does not depend on weight values), fp16, at 512 px: seconds per edit (first edit = inversion + edit; later
# edit = the same inversion reused), forward-equivalents, pass counts and peak GPU memory, for move and appearance
# with the official and fast presets, eager and compiled (pipe.enable_compile: the warm-up line is the compiled
# path's cold start; the compiled run also reports its largest grey-level difference from eager).
# Needs diffusers and transformers importable and this repository's src/ (or dragondiff installed). Meant to fit in
# 5 minutes on an H100 (untested: no GPU was lent since the compiled path exists).
#   bash benchmarks/gpu_check.sh
#   TASKS="move resize drag appearance paste" PRESETS="official paper fast" SIZES="512 768" bash benchmarks/gpu_check.sh
#   COMPILE=off bash benchmarks/gpu_check.sh          # eager only
# Output: a table per run on stdout, JSON in ${OUT:-out/bench}/speed-gpu-<size>[-inductor].json.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD/src" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
TASKS=${TASKS:-move appearance}
PRESETS=${PRESETS:-official fast}
SIZES=${SIZES:-512}
COMPILE=${COMPILE:-off inductor}
DEST=${OUT:-out/bench}
mkdir -p "$DEST"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
for size in $SIZES; do
  for compile in $COMPILE; do
    suffix=$([ "$compile" = off ] && echo "" || echo "-$compile")
    python3 -m dragondiff bench speed --model sd15-shaped --device cuda --dtype float16 --size "$size" \
      --tasks $TASKS --presets $PRESETS --compile "$compile" --out "$DEST/speed-gpu-$size$suffix.json"
  done
done
