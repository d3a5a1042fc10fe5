#!/usr/bin/env bash
# One prepared training round of the bundled shapes model on a lent GPU (or a CPU smoke run of the same steps).
# Trains two UNet + text-encoder variants side by side on one device (each too small to fill an H100 alone):
#   A: the shipped architecture (1 layer per block), continued from the package's weights;
#   B: SD1.5's depth (2 layers per block: 9 decoder self-attention layers), from scratch on the shipped VAE.
# Each is exported to a diffusers folder (VAE weights left out: unchanged) and packed as tar parts of <= 15 MiB in
# $OUT (the device tool brings back at most 8 files of 16 MiB). Put back together with:
#   cat model-A.tar.part-* | tar -x -C out/   (then copy the shipped VAE weights into out/model-A/vae)
# Env: DEVICE (cuda), MINUTES per variant (6.3), BATCH (256), POOL (50000), REFRESH (2000 scenes / 200 steps).
set -euo pipefail
DEVICE=${DEVICE:-cuda} MINUTES=${MINUTES:-6.3} BATCH=${BATCH:-256} POOL=${POOL:-50000} REFRESH=${REFRESH:-2000}
OUT=${OUT:?set OUT to the folder that receives the packed models}
WORK=${WORK:-$(mktemp -d)}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TQDM_MININTERVAL=5
common=(--device "$DEVICE" --minutes "$MINUTES" --steps 1000000 --time-schedule --batch "$BATCH"
        --pool-size "$POOL" --refresh-every 200 --refresh-count "$REFRESH" --checkpoint-seconds 60)
python3 -m dragondiff.train.shapes unet --out "$WORK/A" --lr 1.5e-4 "${common[@]}" >"$OUT/train-A.log" 2>&1 &
pa=$!
python3 -m dragondiff.train.shapes unet --out "$WORK/B" --lr 6e-4 --from-scratch --layers-per-block 2 \
  "${common[@]}" >"$OUT/train-B.log" 2>&1 &
pb=$!
status=0
wait $pa || status=1
wait $pb || status=1
tail -n 3 "$OUT/train-A.log" "$OUT/train-B.log"
weights=$(python3 -c "from dragondiff.shapes.model import WEIGHTS; print(WEIGHTS)")
for m in A B; do
  [ -f "$WORK/$m/unet.pt" ] || continue
  rm -rf "$WORK/model-$m" && cp -r "$weights" "$WORK/model-$m"
  python3 -m dragondiff.train.shapes export --out "$WORK/$m" --dest "$WORK/model-$m"
  rm -f "$WORK/model-$m"/vae/*.safetensors
  cp "$WORK/$m"/log-unet-*.json "$WORK/model-$m/"
  tar -C "$WORK" -cf - "model-$m" | split -b 15M - "$OUT/model-$m.tar.part-"
done
ls -la "$OUT"
exit $status
