#!/usr/bin/env bash
# One prepared training round of the bundled shapes model on a lent GPU (or a CPU smoke run of the same steps):
# the v3 round, at 256 px (the 128 px layouts drawn twice as large: 32x32 latents). Two processes side by side on
# one device (each too small to fill an H100 alone), both continuing from the package's weights:
#   A: UNet + text encoder at $RESOLUTION (the UNet is convolutional; the latent space is the shipped encoder's);
#   V: the VAE's decoder at $RESOLUTION (the encoder, and with it the latent space A trains on, stays fixed).
# A's checkpoint is also copied at $MID_SHARE of its time budget (a second candidate, A-mid, for the validation split).
# Exported as diffusers folders and packed as tar parts of <= 15 MiB in $OUT (the device tool brings back at most
# 8 files of 16 MiB): model-A (UNet + text, VAE left out: shipped), model-Amid (the same), vae-V (the VAE alone).
# Put back together with: cat model-A.tar.part-* | tar -x -C out/  (then copy a VAE into out/model-A/vae)
# (v2 round 3's version of this script, 128 px, A beside a from-scratch 2-layer B, is in git history.)
# Env: DEVICE (cuda), MINUTES per process (7), RESOLUTION (256), BATCH (UNet, 128), VAE_BATCH (32),
#      POOL (20000), REFRESH (2000 scenes / 200 steps), LR (UNet, 2e-4), VAE_LR (2e-4), MID_SHARE (0.6).
set -euo pipefail
DEVICE=${DEVICE:-cuda} MINUTES=${MINUTES:-7} RESOLUTION=${RESOLUTION:-256} BATCH=${BATCH:-128}
VAE_BATCH=${VAE_BATCH:-32} POOL=${POOL:-20000} REFRESH=${REFRESH:-2000} LR=${LR:-2e-4} VAE_LR=${VAE_LR:-2e-4}
MID_SHARE=${MID_SHARE:-0.6}
OUT=${OUT:?set OUT to the folder that receives the packed models}
WORK=${WORK:-$(mktemp -d)}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TQDM_MININTERVAL=5
python3 -m dragondiff.train.shapes unet --out "$WORK/A" --device "$DEVICE" --minutes "$MINUTES" --steps 1000000 \
  --time-schedule --batch "$BATCH" --lr "$LR" --resolution "$RESOLUTION" --pool-size "$POOL" --refresh-every 200 \
  --refresh-count "$REFRESH" --checkpoint-seconds 30 >"$OUT/train-A.log" 2>&1 &
pa=$!
python3 -m dragondiff.train.shapes vae --out "$WORK/V" --device "$DEVICE" --minutes "$MINUTES" --steps 1000000 \
  --time-schedule --batch "$VAE_BATCH" --lr "$VAE_LR" --resolution "$RESOLUTION" >"$OUT/train-V.log" 2>&1 &
pv=$!
# A-mid: A's latest checkpoint once MID_SHARE of its budget has passed (its pool encoding comes first: count from
# the first checkpoint's log line rather than from now).
(
  sleep "$(python3 -c "print(60 * $MINUTES * $MID_SHARE + 20)")"
  mkdir -p "$WORK/Amid" && cp "$WORK/A/unet.pt" "$WORK/Amid/unet.pt" && echo "A-mid copied at $(date +%T)"
) >"$OUT/mid.log" 2>&1 &
pm=$!
status=0
wait $pa || status=1
wait $pv || status=1
wait $pm || true
tail -n 2 "$OUT/train-A.log" "$OUT/train-V.log" "$OUT/mid.log"
weights=$(python3 -c "from dragondiff.shapes.model import WEIGHTS; print(WEIGHTS)")
for m in A Amid; do
  [ -f "$WORK/$m/unet.pt" ] || continue
  rm -rf "$WORK/model-$m" && cp -r "$weights" "$WORK/model-$m"
  python3 -m dragondiff.train.shapes export --out "$WORK/$m" --dest "$WORK/model-$m" || { status=1; continue; }
  rm -f "$WORK/model-$m"/vae/*.safetensors   # the shipped VAE (the encoder is unchanged; decoder: vae-V)
  cp "$WORK"/A/log-unet-*.json "$WORK/model-$m/" 2>/dev/null || true
  tar -C "$WORK" -cf - "model-$m" | split -b 15M - "$OUT/model-$m.tar.part-"
done
if [ -f "$WORK/V/vae.pt" ]; then
  python3 - "$WORK/V" "$WORK/vae-V" <<'PY' || status=1
import json, sys
from pathlib import Path
import torch
from dragondiff.train.shapes import _load_vae
vae = _load_vae(Path(sys.argv[1]))
vae.register_to_config(sample_size=int(json.loads(sorted(Path(sys.argv[1]).glob("log-vae-*.json"))[-1].read_text())["resolution"]))
vae.to(torch.float16).save_pretrained(Path(sys.argv[2]) / "vae", safe_serialization=True)
PY
  cp "$WORK"/V/log-vae-*.json "$WORK/vae-V/" 2>/dev/null || true
  tar -C "$WORK" -cf "$OUT/vae-V.tar" vae-V
fi
ls -la "$OUT"
exit $status
