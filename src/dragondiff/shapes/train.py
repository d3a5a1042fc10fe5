"""Train the bundled shapes model on procedural scenes: VAE first, then UNet + text encoder on cached latents.

    python -m dragondiff.shapes.train vae  --out out/train --steps 1500 --minutes 20
    python -m dragondiff.shapes.train unet --out out/train --steps 3500 --minutes 70
    python -m dragondiff.shapes.train export --out out/train      # -> src/dragondiff/shapes/weights

Every run resumes from its last checkpoint in --out and stops cleanly after --minutes (checkpoint saved), so the
budget can be spent in parts. Data and noise for step k are functions of (seed, k) only, so a resumed run sees
exactly what an uninterrupted one would. Checkpoints are our own local files (torch.save of state dicts).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..tiny import build_tokenizer
from . import model as M
from .scenes import random_scene

VAE_SCENE_BASE = 10_000_000  # seed ranges kept apart: VAE data, UNet pool, evaluation (bench uses its own)
UNET_SCENE_BASE = 20_000_000
EVAL_SCENE_BASE = 90_000_000


def _pixels(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _lr(step: int, total: int, peak: float, warmup: int = 100, floor: float = 0.05) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def _save(path: Path, **state):
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


@torch.no_grad()
def vae_psnr(vae, n: int = 64, base: int = EVAL_SCENE_BASE, batch: int = 16) -> float:
    scores = []
    for start in range(0, n, batch):
        imgs = np.stack([random_scene(base + k).image for k in range(start, min(n, start + batch))])
        rec = vae.decode(vae.encode(_pixels(imgs)).latent_dist.mean).sample
        rec = ((rec.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).numpy().astype(np.uint8)
        scores += [psnr(a, b) for a, b in zip(imgs, rec)]
    return float(np.mean(scores))


def train_vae(out: Path, steps: int, minutes: float, batch: int = 8, crop: int = 64, lr: float = 1e-3,
              kl_weight: float = 5e-5, seed: int = 0):
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "vae.pt"
    torch.manual_seed(seed)
    vae = M.build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    step = 0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        vae.load_state_dict(state["vae"])
        opt.load_state_dict(state["opt"])
        step = int(state["step"])
    deadline = time.time() + 60 * minutes
    vae.train()
    bar = tqdm(total=steps, initial=step, desc="vae")
    while step < steps and time.time() < deadline:
        rng = np.random.default_rng([seed, step])
        imgs = np.stack([random_scene(VAE_SCENE_BASE + step * batch + j).image for j in range(batch)])
        oy, ox = (rng.integers(0, (128 - crop) // 8 + 1, size=2) * 8).tolist()
        x = _pixels(imgs[:, oy : oy + crop, ox : ox + crop])
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        kl = 0.5 * (posterior.mean**2 + posterior.var - 1.0 - posterior.logvar).mean()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + kl_weight * kl
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % 200 == 0 or step == steps:
            _save(ckpt, vae=vae.state_dict(), opt=opt.state_dict(), step=step)
    bar.close()
    _save(ckpt, vae=vae.state_dict(), opt=opt.state_dict(), step=step)
    vae.eval()
    score = vae_psnr(vae)
    print(json.dumps({"stage": "vae", "step": step, "psnr_db_64_scenes": round(score, 2)}))
    return vae


def _load_vae(out: Path):
    vae = M.build_vae()
    vae.load_state_dict(torch.load(out / "vae.pt", weights_only=True)["vae"])
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def _encode_scenes(vae, tokenizer, seeds, batch: int = 64):
    means, stds, tokens = [], [], []
    for start in range(0, len(seeds), batch):
        scenes = [random_scene(int(s)) for s in seeds[start : start + batch]]
        post = vae.encode(_pixels(np.stack([s.image for s in scenes]))).latent_dist
        means.append(post.mean)
        stds.append(post.std)
        tokens.append(tokenizer([s.caption for s in scenes], padding="max_length", max_length=77,
                                truncation=True, return_tensors="pt").input_ids)
    return torch.cat(means), torch.cat(stds), torch.cat(tokens)


def train_unet(out: Path, steps: int, minutes: float, batch: int = 32, lr: float = 1e-3, pool_size: int = 4000,
               refresh_every: int = 200, refresh_count: int = 256, drop_caption: float = 0.1, ema_decay: float = 0.999,
               snr_gamma: float = 5.0, seed: int = 0):
    ckpt = out / "unet.pt"
    vae = _load_vae(out)
    tokenizer = build_tokenizer()
    scheduler = M.build_scheduler()
    alphas = scheduler.alphas_cumprod
    torch.manual_seed(seed + 1)
    unet, text = M.build_unet(), M.build_text_encoder()
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text).requires_grad_(False)
    step, scale = 0, None
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        unet.load_state_dict(state["unet"])
        text.load_state_dict(state["text"])
        ema_unet.load_state_dict(state["ema_unet"])
        ema_text.load_state_dict(state["ema_text"])
        opt.load_state_dict(state["opt"])
        step, scale = int(state["step"]), float(state["scale"])
    # Latent pool: fixed scenes, with a slice replaced by fresh ones every `refresh_every` steps (deterministic).
    pool_seeds = np.arange(pool_size) + UNET_SCENE_BASE
    for r in range(1, step // refresh_every + 1):
        pool_seeds[(np.arange(refresh_count) + (r - 1) * refresh_count) % pool_size] = (
            UNET_SCENE_BASE + pool_size + (r - 1) * refresh_count + np.arange(refresh_count))
    means, stds, tokens = _encode_scenes(vae, tokenizer, pool_seeds)
    if scale is None:
        scale = float(1.0 / means.std())  # SD's scaling_factor: unit-variance latents
    empty = tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    print(json.dumps({"stage": "unet", "resume_step": step, "latent_scale": round(scale, 4),
                      "unet_params": sum(p.numel() for p in unet.parameters()),
                      "text_params": sum(p.numel() for p in text.parameters())}))
    deadline = time.time() + 60 * minutes
    unet.train()
    text.train()
    bar = tqdm(total=steps, initial=step, desc="unet")
    losses = []
    while step < steps and time.time() < deadline:
        if step > 0 and step % refresh_every == 0:
            r = step // refresh_every
            slots = (np.arange(refresh_count) + (r - 1) * refresh_count) % pool_size
            new = UNET_SCENE_BASE + pool_size + (r - 1) * refresh_count + np.arange(refresh_count)
            m, s, t = _encode_scenes(vae, tokenizer, new)
            means[slots], stds[slots], tokens[slots] = m, s, t
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        idx = torch.randint(0, pool_size, (batch,), generator=gen)
        x0 = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)) * scale
        ids = tokens[idx].clone()
        ids[torch.rand(batch, generator=gen) < drop_caption] = empty
        t = torch.randint(0, 1000, (batch,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        pred = unet(noisy, t, encoder_hidden_states=text(ids)[0]).sample
        snr = alphas[t] / (1 - alphas[t])
        weight = torch.clamp(snr, max=snr_gamma) / snr  # min-SNR-γ weighting for ε-prediction
        loss = (weight * F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))).mean()
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, lr, warmup=200)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema, live in ((ema_unet, unet), (ema_text, text)):
                for pe, pl in zip(ema.parameters(), live.parameters()):
                    pe.lerp_(pl, 1 - decay)
        step += 1
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        if step % 250 == 0 or step == steps:
            _save(ckpt, unet=unet.state_dict(), text=text.state_dict(), ema_unet=ema_unet.state_dict(),
                  ema_text=ema_text.state_dict(), opt=opt.state_dict(), step=step, scale=scale)
            with open(out / "unet_log.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "loss50": float(np.mean(losses[-50:]))}) + "\n")
    bar.close()
    _save(ckpt, unet=unet.state_dict(), text=text.state_dict(), ema_unet=ema_unet.state_dict(),
          ema_text=ema_text.state_dict(), opt=opt.state_dict(), step=step, scale=scale)
    print(json.dumps({"stage": "unet", "step": step, "loss_last_200": float(np.mean(losses[-200:] or [float('nan')]))}))


def export(out: Path, dest: Path = M.WEIGHTS):
    """EMA UNet + text encoder and the VAE, fp16 safetensors in SD's diffusers layout."""
    state = torch.load(out / "unet.pt", weights_only=True)
    vae = _load_vae(out)
    vae.register_to_config(scaling_factor=state["scale"])
    unet, text = M.build_unet(), M.build_text_encoder()
    unet.load_state_dict(state["ema_unet"])
    text.load_state_dict(state["ema_text"])
    dest.mkdir(parents=True, exist_ok=True)
    for name, module in (("unet", unet), ("vae", vae), ("text_encoder", text)):
        module.to(torch.float16).save_pretrained(dest / name, safe_serialization=True)
    build_tokenizer().save_pretrained(dest / "tokenizer")
    M.build_scheduler().save_pretrained(dest / "scheduler")
    (dest / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False,
        "dragondiff_training": {"unet_steps": int(state["step"]), "latent_scale": state["scale"]},
    }, indent=1))
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    print(json.dumps({"exported_to": str(dest), "bytes": size, "unet_steps": int(state["step"])}))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m dragondiff.shapes.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["vae", "unet", "export"])
    parser.add_argument("--out", type=Path, default=Path("out/train"))
    parser.add_argument("--steps", type=int, default=None, help="total steps of the stage (vae 1500, unet 3500)")
    parser.add_argument("--minutes", type=float, default=600.0, help="stop (with a checkpoint) after this long")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.stage == "vae":
        train_vae(args.out, args.steps or 1500, args.minutes, seed=args.seed)
    elif args.stage == "unet":
        train_unet(args.out, args.steps or 3500, args.minutes, seed=args.seed)
    else:
        export(args.out)


if __name__ == "__main__":
    main()
