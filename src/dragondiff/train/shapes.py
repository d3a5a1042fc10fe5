"""Train the bundled shapes model: VAE, then UNet + text encoder on cached latents, export, quality gates.

    python -m dragondiff.train.shapes all --out out/train --minutes 90          # everything, one command
    python -m dragondiff.train.shapes vae  --out out/train --minutes 20          # one stage
    python -m dragondiff.train.shapes unet --out out/train --minutes 70 --steps 8000
    python -m dragondiff.train.shapes export --out out/train                     # -> src/dragondiff/shapes/weights
    python -m dragondiff.train.shapes gates                                      # quality of the shipped weights

Where a stage starts from:
- its checkpoint in --out (`vae.pt`, `unet.pt`), if there is one: the run resumes where it stopped;
- otherwise the weights shipped in the package, so CPU training continues from what is on main. The VAE then
  trains its decoder only: the encoder, and with it the latent space the shipped UNet learned, stays fixed;
- with --from-scratch, fresh random weights (the VAE trains whole; the UNet's latent scale is measured anew).

Each stage stops cleanly after its time budget (checkpoint saved), writes a JSON log per run (steps, samples seen,
loss, wall time, device) and shows a progress bar with the loss. Data and noise for step k are functions of
(seed, k), so a resumed run sees what an uninterrupted one would. Scenes are drawn in batches by torch on the
training device (`render_torch`), forward passes run under bf16 autocast (CPU and CUDA), EMA weights are exported.
Checkpoints are our own local files (torch.save of state dicts, loaded with weights_only=True).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..shapes import model as M
from ..shapes.metrics import psnr
from ..shapes.scenes import EVAL_SCENE_BASE, SIZE, UNET_SCENE_BASE, VAE_SCENE_BASE, random_layout
from ..shapes.tokenizer import build_tokenizer
from .render_torch import captions, render_batch

SHIPPED = "shipped"  # marks a stage initialised from the package's weights


# ------------------------------------------------------------------------------------------------ helpers


def _lr(step: int, total: int, peak: float, warmup: int = 100, floor: float = 0.05,
        time_progress: float = 0.0) -> float:
    """Warm-up, then cosine to `floor`; `time_progress` (share of the time budget used) can finish it early."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, max((step - warmup) / max(1, total - warmup), time_progress))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def _save(path: Path, **state):
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def _autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def _optimizer_step(opt, params, loss: torch.Tensor, lr: float) -> None:
    """One AdamW step at learning rate `lr`, gradients clipped to norm 1 (both stages)."""
    for g in opt.param_groups:
        g["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def _pixels(layouts, device, size: int = SIZE) -> torch.Tensor:
    return render_batch(layouts, size=size, device=device) / 127.5 - 1.0


class RunLog:
    """One JSON file per run of a stage, rewritten at every checkpoint (so a killed run still leaves its log)."""

    def __init__(self, out: Path, stage: str, device: torch.device, **info):
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.path = out / f"log-{stage}-{stamp}.json"
        self.start = time.time()
        self.data = {"stage": stage, "device": str(device), "started": stamp, **info, "points": []}

    def point(self, step: int, samples: int, loss: float, **extra):
        self.data["points"].append({"step": step, "samples_seen": samples, "loss": round(loss, 6),
                                    "wall_s": round(time.time() - self.start, 1), **extra})
        self.data.update(step=step, samples_seen=samples, loss=round(loss, 6),
                         wall_s=round(time.time() - self.start, 1))
        self.path.write_text(json.dumps(self.data, indent=1))


def _shipped_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(M.WEIGHTS, subfolder="vae").float()


def _shipped_unet_text():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(M.WEIGHTS, subfolder="unet").float()
    text = CLIPTextModel.from_pretrained(M.WEIGHTS / "text_encoder").float()
    return unet, text


# ---------------------------------------------------------------------------------------------------- VAE


@torch.no_grad()
def vae_psnr(vae, n: int = 64, base: int = EVAL_SCENE_BASE, batch: int = 32, device="cpu", size: int = SIZE) -> float:
    scores = []
    for start in range(0, n, batch):
        x = _pixels([random_layout(base + k) for k in range(start, min(n, start + batch))], device, size)
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        to_uint8 = lambda t: ((t + 1) * 127.5).round().permute(0, 2, 3, 1).cpu().numpy().astype(np.uint8)  # noqa: E731
        scores += [psnr(a, b) for a, b in zip(to_uint8(x), to_uint8(rec))]
    return float(np.mean(scores))


def train_vae(out: Path, steps: int, minutes: float, device: torch.device, precision: str = "bf16",
              batch: int | None = None, lr: float | None = None, kl_weight: float = 5e-5, seed: int = 0,
              from_scratch: bool = False, part: str | None = None, resolution: int = SIZE,
              time_schedule: bool = False):
    """Train the VAE. Starting from the shipped weights, only the decoder trains (part='decoder').
    resolution: scene size in px (the 128 px layouts drawn scaled; 256 for the 32x32-latent model).
    time_schedule: the cosine LR ends with the time budget if that comes first (as for the UNet)."""
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "vae.pt"
    torch.manual_seed(seed)
    state = torch.load(ckpt, weights_only=True) if ckpt.exists() else None
    origin = state["origin"] if state else ("scratch" if from_scratch else SHIPPED)
    vae = M.build_vae() if origin == "scratch" else _shipped_vae()
    part = part or (state["part"] if state else ("all" if origin == "scratch" else "decoder"))
    # The whole VAE trains on 64 px crops (a quarter of the cost); the decoder alone on whole scenes, because
    # fine-tuning it on crops of whole-scene latents measured worse (25.7 dB after 24 steps, from 27.1).
    crop = 64 if part == "all" else resolution
    batch = batch or (8 if part == "all" else 16)
    lr = lr or (1e-3 if origin == "scratch" else 3e-4)
    if state:
        vae.load_state_dict(state["vae"])
    vae.to(device)
    vae.requires_grad_(False)
    trainable = vae if part == "all" else vae.decoder
    if part == "decoder":
        vae.post_quant_conv.requires_grad_(True)
    trainable.requires_grad_(True)
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    step = 0
    if state:
        opt.load_state_dict(state["opt"])
        step = int(state["step"])
    vae.eval()
    start_psnr = None if state else round(vae_psnr(vae, device=device, size=resolution), 2)  # what training starts from
    log = RunLog(out, "vae", device, origin=origin, part=part, batch=batch, crop=crop, lr=lr, precision=precision,
                 resolution=resolution, psnr_db_64_scenes_at_start=start_psnr,
                 params_trained=sum(p.numel() for p in params), resume_step=step)

    def checkpoint():
        _save(ckpt, vae=vae.state_dict(), opt=opt.state_dict(), step=step, origin=origin, part=part)

    start = time.time()
    deadline = start + 60 * minutes
    vae.train()
    bar = tqdm(total=steps, initial=step, desc=f"vae ({part})")
    losses: list[float] = []
    while step < steps and time.time() < deadline:
        rng = np.random.default_rng([seed, step])
        x = _pixels([random_layout(VAE_SCENE_BASE + step * batch + j) for j in range(batch)], device, resolution)
        oy, ox = (rng.integers(0, (x.shape[-1] - crop) // 8 + 1, size=2) * 8).tolist()
        gen = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + step)
        if part == "decoder":  # latents of the whole scene (as at inference), cropped with their pixels
            with torch.no_grad():
                posterior = vae.encode(x).latent_dist
            ly, lx, lc = oy // 8, ox // 8, crop // 8
            mean = posterior.mean[:, :, ly : ly + lc, lx : lx + lc]
            std = posterior.std[:, :, ly : ly + lc, lx : lx + lc]
        x = x[:, :, oy : oy + crop, ox : ox + crop]
        with _autocast(device, precision):
            if part == "all":
                posterior = vae.encode(x).latent_dist
                mean, std = posterior.mean, posterior.std
            z = mean + std * torch.randn(mean.shape, generator=gen).to(device)
            rec = vae.decode(z).sample.float()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
        if part == "all":
            kl = 0.5 * (posterior.mean**2 + posterior.var - 1.0 - posterior.logvar).float().mean()
            loss = loss + kl_weight * kl
        used = (time.time() - start) / (deadline - start) if time_schedule else 0.0
        _optimizer_step(opt, params, loss, _lr(step, steps, lr, time_progress=used))
        step += 1
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        if step % 200 == 0 or step == steps:
            checkpoint()
            log.point(step, step * batch, float(np.mean(losses[-50:])))
    bar.close()
    checkpoint()
    vae.eval()
    score = vae_psnr(vae, device=device, size=resolution)
    log.point(step, step * batch, float(np.mean(losses[-50:] or [float("nan")])), psnr_db_64_scenes=round(score, 2))
    print(json.dumps({"stage": "vae", "step": step, "psnr_db_64_scenes": round(score, 2), "log": str(log.path)}))
    return vae


def _load_vae(out: Path):
    ckpt = out / "vae.pt"
    if not ckpt.exists():  # no VAE trained in this folder: the shipped one
        return _shipped_vae().eval().requires_grad_(False)
    state = torch.load(ckpt, weights_only=True)
    vae = M.build_vae() if state["origin"] == "scratch" else _shipped_vae()
    vae.load_state_dict(state["vae"])
    return vae.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------- UNet + text encoder


@torch.no_grad()
def _encode_scenes(vae, tokenizer, seeds, device, batch: int = 64, size: int = SIZE):
    means, stds, tokens = [], [], []
    for start in range(0, len(seeds), batch):
        layouts = [random_layout(int(s)) for s in seeds[start : start + batch]]
        post = vae.encode(_pixels(layouts, device, size)).latent_dist
        means.append(post.mean)
        stds.append(post.std)
        tokens.append(tokenizer(captions(layouts), padding="max_length", max_length=77, truncation=True,
                                return_tensors="pt").input_ids.to(device))
    return torch.cat(means), torch.cat(stds), torch.cat(tokens)


class LatentPool:
    """Encoded training scenes (posterior mean and std, caption tokens): fixed seeds, with a slice replaced by
    fresh scenes every `refresh_every` steps. Deterministic in the step, so a resumed run rebuilds the pool an
    uninterrupted one would have at that step."""

    def __init__(self, vae, tokenizer, device, size: int, refresh_every: int, refresh_count: int, resolution: int,
                 step: int = 0):
        self.vae, self.tokenizer, self.device, self.resolution = vae, tokenizer, device, resolution
        self.size, self.refresh_every, self.refresh_count = size, refresh_every, refresh_count
        seeds = np.arange(size) + UNET_SCENE_BASE
        for r in range(1, step // refresh_every + 1):
            seeds[self._slots(r)] = self._fresh(r)
        self.means, self.stds, self.tokens = _encode_scenes(vae, tokenizer, seeds, device, size=resolution)

    def _slots(self, r: int) -> np.ndarray:
        return (np.arange(self.refresh_count) + (r - 1) * self.refresh_count) % self.size

    def _fresh(self, r: int) -> np.ndarray:
        return UNET_SCENE_BASE + self.size + (r - 1) * self.refresh_count + np.arange(self.refresh_count)

    def refresh(self, step: int) -> None:
        """At every `refresh_every`-th step, replace the next slice of the pool with fresh scenes."""
        if step > 0 and step % self.refresh_every == 0:
            r = step // self.refresh_every
            slots = torch.from_numpy(self._slots(r)).to(self.device)
            m, s, t = _encode_scenes(self.vae, self.tokenizer, self._fresh(r), self.device, size=self.resolution)
            self.means[slots], self.stds[slots], self.tokens[slots] = m, s, t

    def sample(self, gen, batch: int, scale: float, drop_caption: float, empty):
        """(scaled latents re-sampled from their posteriors, caption tokens with `drop_caption` of them empty)."""
        idx = torch.randint(0, self.size, (batch,), generator=gen, device=self.device)
        means = self.means[idx]
        x0 = (means + self.stds[idx] * torch.randn(means.shape, generator=gen, device=self.device)) * scale
        drop = torch.rand(batch, generator=gen, device=self.device) < drop_caption
        return x0, torch.where(drop[:, None], empty, self.tokens[idx])


def train_unet(out: Path, steps: int, minutes: float, device: torch.device, precision: str = "bf16",
               batch: int = 32, lr: float | None = None, pool_size: int = 4000, refresh_every: int = 200,
               refresh_count: int = 256, drop_caption: float = 0.1, ema_decay: float = 0.999,
               snr_gamma: float = 5.0, seed: int = 0, from_scratch: bool = False, layers_per_block: int = 1,
               time_schedule: bool = False, checkpoint_seconds: float = 0.0, resolution: int = SIZE):
    """UNet + text encoder on a pool of encoded scenes.

    time_schedule: the cosine LR ends when the time budget does, if that comes before `steps` (for a one-shot run
    on a lent GPU, whose speed is not known in advance; resuming is then no longer step-exact).
    checkpoint_seconds: at least this long between checkpoints (a GPU does 250 steps in seconds).
    resolution: scene size in px (the 128 px layouts drawn scaled: 256 gives 32x32 latents; the UNet is
    convolutional, so the shipped weights continue at any size).
    """
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "unet.pt"
    vae = _load_vae(out).to(device)
    tokenizer = build_tokenizer()
    alphas = M.build_scheduler().alphas_cumprod.to(device)
    torch.manual_seed(seed + 1)
    state = torch.load(ckpt, weights_only=True) if ckpt.exists() else None
    origin = state["origin"] if state else ("scratch" if from_scratch else SHIPPED)
    if state:  # the architecture of the run being resumed
        layers_per_block = int(state.get("layers_per_block", 1))
    if origin == "scratch":
        unet, text = M.build_unet(layers_per_block), M.build_text_encoder()
    else:
        unet, text = _shipped_unet_text()
        layers_per_block = int(unet.config.layers_per_block)
    lr = lr or (1e-3 if origin == "scratch" else 2e-4)
    unet.to(device)
    text.to(device)
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, fused=device.type == "cuda")
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text).requires_grad_(False)
    step, scale = 0, None if origin == "scratch" else float(vae.config.scaling_factor)
    if state:
        unet.load_state_dict(state["unet"])
        text.load_state_dict(state["text"])
        ema_unet.load_state_dict(state["ema_unet"])
        ema_text.load_state_dict(state["ema_text"])
        opt.load_state_dict(state["opt"])
        step, scale = int(state["step"]), float(state["scale"])
    t0 = time.time()
    pool = LatentPool(vae, tokenizer, device, pool_size, refresh_every, refresh_count, resolution, step)
    if scale is None:
        scale = float(1.0 / pool.means.std())  # SD's scaling_factor: unit-variance latents
    empty = tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids.to(device)
    log = RunLog(out, "unet", device, origin=origin, batch=batch, lr=lr, precision=precision, latent_scale=scale,
                 resume_step=step, pool_encode_s=round(time.time() - t0, 1), layers_per_block=layers_per_block,
                 pool_size=pool_size, refresh_every=refresh_every, refresh_count=refresh_count,
                 time_schedule=time_schedule, resolution=resolution,
                 unet_params=sum(p.numel() for p in unet.parameters()),
                 text_params=sum(p.numel() for p in text.parameters()))
    print(json.dumps({k: v for k, v in log.data.items() if k != "points"}))

    def checkpoint(step):
        _save(ckpt, unet=unet.state_dict(), text=text.state_dict(), ema_unet=ema_unet.state_dict(),
              ema_text=ema_text.state_dict(), opt=opt.state_dict(), step=step, scale=scale, origin=origin,
              layers_per_block=layers_per_block, resolution=resolution)

    def loss_of(gen, x0, ids):
        t = torch.randint(0, 1000, (batch,), generator=gen, device=device)
        noise = torch.randn(x0.shape, generator=gen, device=device)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with _autocast(device, precision):
            pred = unet(noisy, t, encoder_hidden_states=text(ids)[0]).sample.float()
        snr = alphas[t] / (1 - alphas[t])
        weight = torch.clamp(snr, max=snr_gamma) / snr  # min-SNR-γ weighting for ε-prediction
        return (weight * F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))).mean()

    _denoiser_loop("unet", log, step, steps, minutes, pool, batch, scale, drop_caption, empty, seed, loss_of, opt,
                   params, lr, 200 if origin == "scratch" else 50, ((ema_unet, unet), (ema_text, text)), ema_decay,
                   time_schedule, checkpoint, checkpoint_seconds)


def _denoiser_loop(stage: str, log: RunLog, step: int, steps: int, minutes: float, pool: LatentPool, batch: int,
                   scale: float, drop_caption: float, empty, seed: int, loss_of, opt, params, lr: float, warmup: int,
                   ema_pairs, ema_decay: float, time_schedule: bool, checkpoint, checkpoint_seconds: float) -> None:
    """The training loop both denoiser stages share: pool refresh, a batch drawn from (seed, step), the stage's
    loss (`loss_of(generator, x0, ids)`), AdamW at the warm-up + cosine LR, EMA of each (ema, live) pair, and a
    checkpoint and log point every 250 steps (at least `checkpoint_seconds` apart) and at the end."""
    device = pool.device
    start, last_checkpoint = time.time(), time.time()
    deadline = start + 60 * minutes
    for _, live in ema_pairs:
        live.train()
    bar = tqdm(total=steps, initial=step, desc=stage)
    losses: list[float] = []
    pending: list[torch.Tensor] = []  # losses still on the device: read back every 25 steps, not every step

    def read_losses():
        if pending:
            losses.extend(torch.stack(pending).float().cpu().tolist())
            pending.clear()

    while step < steps and time.time() < deadline:
        pool.refresh(step)
        # Random numbers drawn on the training device: no host round trip per step on a GPU (same numbers on CPU).
        gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + step)
        x0, ids = pool.sample(gen, batch, scale, drop_caption, empty)
        loss = loss_of(gen, x0, ids)
        used = (time.time() - start) / (deadline - start) if time_schedule else 0.0
        _optimizer_step(opt, params, loss, _lr(step, steps, lr, warmup=warmup, time_progress=used))
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema, live in ema_pairs:
                torch._foreach_lerp_(list(ema.parameters()), list(live.parameters()), 1 - decay)
        step += 1
        pending.append(loss.detach())
        bar.update(1)
        if len(pending) == 25 or step == steps:
            read_losses()
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        if step % 250 == 0 or step == steps:
            if time.time() - last_checkpoint >= checkpoint_seconds or step == steps:
                checkpoint(step)
                last_checkpoint = time.time()
            log.point(step, step * batch, float(np.mean(losses[-50:] or [float("nan")])))
    bar.close()
    read_losses()
    checkpoint(step)
    log.point(step, step * batch, float(np.mean(losses[-200:] or [float("nan")])))
    print(json.dumps({"stage": stage, "step": step, "loss_last_200": log.data["loss"], "log": str(log.path)}))


# ---------------------------------------------------------------------------- flow transformer + text encoder


def _flow_start(out: Path, from_scratch: bool):
    """(transformer, text encoder, origin) where a flow run starts: the package's flow weights when there are
    some (a later round continues them), else a fresh transformer beside the UNet model's trained text encoder
    (given a projection for SD3's pooled input)."""
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    if M.flow_is_available() and not from_scratch:
        transformer = SD3Transformer2DModel.from_pretrained(M.FLOW_WEIGHTS, subfolder="transformer").float()
        text = CLIPTextModelWithProjection.from_pretrained(M.FLOW_WEIGHTS / "text_encoder").float()
        return transformer, text, SHIPPED
    if from_scratch:
        return M.build_flow_transformer(), M.build_flow_text_encoder(), "scratch"
    return M.build_flow_transformer(), M.build_flow_text_encoder(_shipped_unet_text()[1]), "scratch+shipped-text"


def flow_condition(text, ids):
    """What `SD3Backbone` feeds the transformer for a one-CLIP model: the penultimate hidden states as the token
    sequence (no T5 block) and the projected pooled output."""
    out = text(ids, output_hidden_states=True)
    return out.hidden_states[-2], out.text_embeds


def train_flow(out: Path, steps: int, minutes: float, device: torch.device, precision: str = "bf16",
               batch: int = 32, lr: float | None = None, pool_size: int = 4000, refresh_every: int = 200,
               refresh_count: int = 256, drop_caption: float = 0.1, ema_decay: float = 0.999, seed: int = 0,
               from_scratch: bool = False, time_schedule: bool = False, checkpoint_seconds: float = 0.0,
               resolution: int = SIZE):
    """SD3-style transformer + text encoder with SD3's rectified-flow objective on the UNet stage's scene pool:
    x_t = (1 - s) x0 + s noise with s = sigmoid(n), n ~ N(0, 1) (logit-normal), the model's velocity regressed on
    noise - x0, the timestep fed as s * 1000 (the scheduler's, shift 1). The VAE is the package's (frozen)."""
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "flow.pt"
    vae = _load_vae(out).to(device)
    tokenizer = build_tokenizer()
    torch.manual_seed(seed + 2)
    state = torch.load(ckpt, weights_only=True) if ckpt.exists() else None
    transformer, text, origin = _flow_start(out, from_scratch)
    if state:
        origin = state["origin"]
    lr = lr or (3e-4 if origin != SHIPPED else 1e-4)
    transformer.to(device)
    text.to(device)
    params = list(transformer.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, fused=device.type == "cuda")
    ema_tr, ema_text = copy.deepcopy(transformer).requires_grad_(False), copy.deepcopy(text).requires_grad_(False)
    step, scale = 0, float(vae.config.scaling_factor)
    if state:
        transformer.load_state_dict(state["transformer"])
        text.load_state_dict(state["text"])
        ema_tr.load_state_dict(state["ema_transformer"])
        ema_text.load_state_dict(state["ema_text"])
        opt.load_state_dict(state["opt"])
        step = int(state["step"])
    t0 = time.time()
    pool = LatentPool(vae, tokenizer, device, pool_size, refresh_every, refresh_count, resolution, step)
    empty = tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids.to(device)
    log = RunLog(out, "flow", device, origin=origin, batch=batch, lr=lr, precision=precision, latent_scale=scale,
                 resume_step=step, pool_encode_s=round(time.time() - t0, 1), pool_size=pool_size,
                 refresh_every=refresh_every, refresh_count=refresh_count, time_schedule=time_schedule,
                 resolution=resolution, transformer_params=sum(p.numel() for p in transformer.parameters()),
                 text_params=sum(p.numel() for p in text.parameters()))
    print(json.dumps({k: v for k, v in log.data.items() if k != "points"}))

    def checkpoint(step):
        _save(ckpt, transformer=transformer.state_dict(), text=text.state_dict(), ema_transformer=ema_tr.state_dict(),
              ema_text=ema_text.state_dict(), opt=opt.state_dict(), step=step, scale=scale, origin=origin,
              resolution=resolution)

    def loss_of(gen, x0, ids):
        sigma = torch.sigmoid(torch.randn(batch, generator=gen, device=device))  # logit-normal(0, 1)
        noise = torch.randn(x0.shape, generator=gen, device=device)
        s = sigma.view(-1, 1, 1, 1)
        noisy = (1 - s) * x0 + s * noise
        with _autocast(device, precision):
            states, pooled = flow_condition(text, ids)
            pred = transformer(noisy, encoder_hidden_states=states, pooled_projections=pooled,
                               timestep=sigma * 1000).sample.float()
        return F.mse_loss(pred, noise - x0)

    _denoiser_loop("flow", log, step, steps, minutes, pool, batch, scale, drop_caption, empty, seed, loss_of, opt,
                   params, lr, 200 if origin != SHIPPED else 50, ((ema_tr, transformer), (ema_text, text)), ema_decay,
                   time_schedule, checkpoint, checkpoint_seconds)


# ------------------------------------------------------------------------------------------ export, gates

DEFAULTS_FILE = "dragondiff_defaults.json"  # the model's recommended edit settings; kept across exports


def export(out: Path, dest: Path = M.WEIGHTS):
    """EMA UNet + text encoder and the VAE, fp16 safetensors in SD's diffusers layout."""
    state = torch.load(out / "unet.pt", weights_only=True)
    vae = _load_vae(out)
    vae.register_to_config(scaling_factor=state["scale"])
    unet, text = M.build_unet(int(state.get("layers_per_block", 1))), M.build_text_encoder()
    unet.load_state_dict(state["ema_unet"])
    text.load_state_dict(state["ema_text"])
    resolution = int(state.get("resolution", SIZE))  # the size it trained at (the config's sample sizes say so)
    unet.register_to_config(sample_size=resolution // 8)
    vae.register_to_config(sample_size=resolution)
    dest.mkdir(parents=True, exist_ok=True)
    index_path = dest / "model_index.json"
    history = json.loads(index_path.read_text()).get("dragondiff_training", {}) if index_path.exists() else {}
    for name, module in (("unet", unet), ("vae", vae), ("text_encoder", text)):
        shutil.rmtree(dest / name, ignore_errors=True)  # no stale single file beside new shards, or the reverse
        module.to(torch.float16).save_pretrained(dest / name, safe_serialization=True, max_shard_size="16MB")
    build_tokenizer().save_pretrained(dest / "tokenizer")
    M.build_scheduler().save_pretrained(dest / "scheduler")
    rounds = list(history.get("rounds", []))
    # One entry per training round: the steps of that run (continued rounds add to the earlier ones).
    rounds.append({"unet_steps": int(state["step"]), "origin": state.get("origin", "scratch"),
                   "layers_per_block": int(state.get("layers_per_block", 1)), "resolution": resolution,
                   "exported": time.strftime("%Y-%m-%d %H:%M")})
    index_path.write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False,
        "dragondiff_training": {"latent_scale": state["scale"], "rounds": rounds},
    }, indent=1))
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    print(json.dumps({"exported_to": str(dest), "bytes": size, "unet_steps": int(state["step"])}))


def export_flow(out: Path, dest: Path = M.FLOW_WEIGHTS):
    """EMA transformer + text encoder, the package's VAE (its latent scale), the tokenizer and the flow scheduler:
    an SD3-shaped diffusers folder with one CLIP and no T5 (`SD3Backbone`'s one-CLIP layout)."""
    state = torch.load(out / "flow.pt", weights_only=True)
    transformer, text = M.build_flow_transformer(), M.build_flow_text_encoder()
    transformer.load_state_dict(state["ema_transformer"])
    text.load_state_dict(state["ema_text"])
    vae = _load_vae(out)
    vae.register_to_config(scaling_factor=state["scale"], shift_factor=0.0)
    dest.mkdir(parents=True, exist_ok=True)
    index_path = dest / "model_index.json"
    history = json.loads(index_path.read_text()).get("dragondiff_training", {}) if index_path.exists() else {}
    for name, module in (("transformer", transformer), ("vae", vae), ("text_encoder", text)):
        shutil.rmtree(dest / name, ignore_errors=True)
        module.to(torch.float16).save_pretrained(dest / name, safe_serialization=True, max_shard_size="16MB")
    build_tokenizer().save_pretrained(dest / "tokenizer")
    M.build_flow_scheduler().save_pretrained(dest / "scheduler")
    rounds = list(history.get("rounds", []))
    rounds.append({"transformer_steps": int(state["step"]), "origin": state.get("origin", "scratch"),
                   "resolution": int(state.get("resolution", SIZE)), "exported": time.strftime("%Y-%m-%d %H:%M")})
    none = [None, None]
    index_path.write_text(json.dumps({
        "_class_name": "StableDiffusion3Pipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "text_encoder_2": none, "tokenizer_2": none, "text_encoder_3": none, "tokenizer_3": none,
        "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
        "dragondiff_training": {"latent_scale": state["scale"], "rounds": rounds},
    }, indent=1))
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    print(json.dumps({"exported_to": str(dest), "bytes": size, "transformer_steps": int(state["step"])}))


def gates() -> int:
    """The model-quality gates of `dragondiff bench shapes --quality`, on the weights in the package (prints them).
    Run as that command, so that training and the benchmark stay independent of each other."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "dragondiff", "bench", "shapes", "--quality"]).returncode


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m dragondiff.train.shapes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["all", "vae", "unet", "export", "gates", "flow", "export-flow"])
    parser.add_argument("--out", type=Path, default=Path("out/train"), help="checkpoints and logs (out/train)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="training device (cuda when available, else cpu)")
    parser.add_argument("--minutes", type=float, default=90.0,
                        help="time budget: of the stage, or for `all` of both stages (VAE gets --vae-share)")
    parser.add_argument("--vae-share", type=float, default=0.2, help="`all`: share of --minutes for the VAE (0.2)")
    parser.add_argument("--steps", type=int, default=None, help="total steps of the LR schedule (vae 2000, unet 8000)")
    parser.add_argument("--vae-steps", type=int, default=2000, help="`all`: the VAE's total steps (2000)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (VAE 16 decoder-only / 8 whole, UNet 32)")
    parser.add_argument("--lr", type=float, default=None, help="peak LR (1e-3 from scratch, lower when continuing)")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"], help="autocast precision (bf16)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--from-scratch", action="store_true", help="random init instead of the shipped weights")
    parser.add_argument("--layers-per-block", type=int, default=1, choices=[1, 2],
                        help="UNet depth from scratch: 1 (shipped so far) or 2 (SD1.5's: 9 decoder "
                             "self-attention layers)")
    parser.add_argument("--pool-size", type=int, default=4000, help="UNet: encoded scenes in the pool (4000)")
    parser.add_argument("--refresh-every", type=int, default=200, help="UNet: steps between pool refreshes (200)")
    parser.add_argument("--refresh-count", type=int, default=256, help="UNet: scenes replaced per refresh (256)")
    parser.add_argument("--time-schedule", action="store_true",
                        help="end the cosine LR with the time budget (a one-shot GPU run of unknown speed)")
    parser.add_argument("--checkpoint-seconds", type=float, default=0.0,
                        help="UNet: at least this long between checkpoints (0: every 250 steps)")
    parser.add_argument("--dest", type=Path, default=M.WEIGHTS,
                        help="export: where the diffusers folder goes (default: the package's weights)")
    parser.add_argument("--resolution", type=int, default=SIZE,
                        help="scene size in px: the 128 px layouts drawn scaled (128; 256 gives 32x32 latents)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.stage in ("all", "vae"):
        minutes = args.minutes * (args.vae_share if args.stage == "all" else 1.0)
        steps = args.vae_steps if args.stage == "all" else (args.steps or 2000)
        train_vae(args.out, steps, minutes, device, args.precision, batch=args.batch if args.stage == "vae" else None,
                  lr=args.lr if args.stage == "vae" else None, seed=args.seed, from_scratch=args.from_scratch,
                  resolution=args.resolution, time_schedule=args.time_schedule)
    if args.stage in ("all", "unet"):
        minutes = args.minutes * ((1 - args.vae_share) if args.stage == "all" else 1.0)
        train_unet(args.out, args.steps or 8000, minutes, device, args.precision, batch=args.batch or 32,
                   lr=args.lr, seed=args.seed, from_scratch=args.from_scratch, layers_per_block=args.layers_per_block,
                   pool_size=args.pool_size, refresh_every=args.refresh_every, refresh_count=args.refresh_count,
                   time_schedule=args.time_schedule, checkpoint_seconds=args.checkpoint_seconds,
                   resolution=args.resolution)
    if args.stage == "flow":
        train_flow(args.out, args.steps or 8000, args.minutes, device, args.precision, batch=args.batch or 32,
                   lr=args.lr, seed=args.seed, from_scratch=args.from_scratch, pool_size=args.pool_size,
                   refresh_every=args.refresh_every, refresh_count=args.refresh_count,
                   time_schedule=args.time_schedule, checkpoint_seconds=args.checkpoint_seconds,
                   resolution=args.resolution)
    if args.stage == "export-flow":
        export_flow(args.out, args.dest if args.dest != M.WEIGHTS else M.FLOW_WEIGHTS)
    if args.stage in ("all", "export"):
        export(args.out, args.dest)
    if args.stage in ("all", "gates"):
        gates()


if __name__ == "__main__":
    main()
