"""DDIM inversion with memory-bank capture, and the guided DDIM sampler.

Latents are kept in fp32 whatever the model dtype; the UNet sees them cast to its dtype. All per-edit state is in
the arguments: the bank controller, the task, the counters.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch

from .attention import CAPTURE, PLAIN, BankController
from .presets import Preset
from .tasks.base import Task


class NonFiniteError(RuntimeError):
    """NaN or Inf appeared in the latent during sampling."""


class Stopwatch:
    """Seconds per phase of an edit. With `sync` (a CUDA device) it waits for the device at each boundary, so
    the phases are exact but the host can no longer run ahead: the speed benchmark turns it on, edits do not."""

    def __init__(self, sync: torch.device | None = None):
        self.seconds: dict[str, float] = defaultdict(float)
        self.sync = sync if sync is not None and sync.type == "cuda" else None

    @contextmanager
    def phase(self, name: str):
        if self.sync is not None:
            torch.cuda.synchronize(self.sync)
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.sync is not None:
                torch.cuda.synchronize(self.sync)
            self.seconds[name] += time.perf_counter() - start


@dataclass
class PassCounts:
    """UNet work done by one edit. Feature passes are truncated after up_blocks[2]. `watch` times the phases."""

    inversion_unet: int = 0  # batch = number of inverted images
    cfg_unet: int = 0  # batch 2 (uncond, cond)
    time_travel_unet: int = 0  # batch 1
    feature_nograd: int = 0  # batch 1, reference features (computed, not taken from an inversion's cache)
    feature_cached: int = 0  # reference features taken from a reused inversion's cache
    feature_grad: int = 0  # batch 1, generation features
    backward: int = 0  # backward passes (one batched backward carries both energy terms)
    watch: Stopwatch = field(default_factory=Stopwatch, repr=False, compare=False)

    def as_dict(self) -> dict[str, int]:
        return {k: v for k, v in self.__dict__.items() if k != "watch"}


@dataclass
class Schedule:
    """DDIM timesteps t_i (i = 0..n-1, descending) and ᾱ lookups, ᾱ(t < 0) = final_alpha_cumprod."""

    timesteps: list[int]
    alphas_cumprod: torch.Tensor
    final_alpha: torch.Tensor

    @classmethod
    def from_scheduler(cls, scheduler, num_steps: int) -> "Schedule":
        scheduler.set_timesteps(num_steps)
        ts = [int(t) for t in scheduler.timesteps]
        final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float32)
        return cls(ts, scheduler.alphas_cumprod.to(torch.float32), final)

    def alpha(self, t: int) -> torch.Tensor:
        return self.alphas_cumprod[t] if t >= 0 else self.final_alpha

    def prev(self, i: int) -> int:
        """The timestep after step i (the next, less noisy one); -1 after the last step (ᾱ = final_alpha)."""
        return self.timesteps[i + 1] if i + 1 < len(self.timesteps) else -1

    def grid_step(self, i: int) -> int:
        """Step index on the 50-step grid the presets and bank windows are defined on."""
        return i * 50 // len(self.timesteps)


# --- DDIM step math (η = 0 unless sigma is given). a_* are ᾱ values (tensors). ---------------------------------


def predict_x0(z: torch.Tensor, eps: torch.Tensor, a_t: torch.Tensor) -> torch.Tensor:
    return (z - (1 - a_t).sqrt() * eps) / a_t.sqrt()


def ddim_step(z, eps_x0, a_t, a_prev, eps_dir=None, sigma=None, noise=None) -> torch.Tensor:
    """z_t -> z_prev. x0 comes from `eps_x0` (the guided ε), the direction from `eps_dir` (default the same ε);
    with sigma and noise, the stochastic DDIM step (η > 0)."""
    eps_dir = eps_x0 if eps_dir is None else eps_dir
    x0 = predict_x0(z, eps_x0, a_t)
    if sigma is None:
        return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps_dir
    return a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).sqrt() * eps_dir + sigma * noise


def ddim_inversion_step(z, eps, a_from, a_to) -> torch.Tensor:
    """z at ᾱ=a_from -> z at the noisier ᾱ=a_to, with ε evaluated at the destination timestep."""
    return a_to.sqrt() * predict_x0(z, eps, a_from) + (1 - a_to).sqrt() * eps


def time_travel(z_prev, eps_src, a_src, a_t) -> torch.Tensor:
    """Deterministic re-noising of z_prev (at ᾱ=a_src) back to ᾱ=a_t, with ε predicted at the source."""
    return a_t.sqrt() * predict_x0(z_prev, eps_src, a_src) + (1 - a_t).sqrt() * eps_src


@torch.no_grad()
def invert(backbone, z0: torch.Tensor, context: torch.Tensor, schedule: Schedule, controller: BankController,
           counts: PassCounts) -> torch.Tensor:
    """DDIM inversion, conditional only. Returns (n+1, B, 4, h, w): [0] = z0, [k] at timestep t_{n-k}.

    eps is evaluated at the destination timestep t (the null-text-inversion convention the official code uses), and the
    decoder self-attention K/V of the call at t_i are stored as bank step i (the official code's off-by-one, kept
    because the bank must match what the official sampler attends to).
    """
    n = len(schedule.timesteps)
    latents = [z0]
    z = z0
    for j in range(n):
        i = n - 1 - j
        t = schedule.timesteps[i]
        with controller.use(CAPTURE, step=i), counts.watch.phase("inversion"):
            eps = backbone.eps(z, t, context)
        counts.inversion_unet += 1
        z = ddim_inversion_step(z, eps, schedule.alpha(schedule.prev(i)), schedule.alpha(t))
        latents.append(z)
    return torch.stack(latents)


def guidance(backbone, task: Task, z: torch.Tensor, ref_features, t: int, cond: torch.Tensor,
             controller: BankController, counts: PassCounts, one_backward: bool = True):
    """g = c·(∇(s·E_edit)⊙M + ∇(s·E_content)⊙(1−M)). Returns (g, energies).

    The two gradients are separate vector-Jacobian products (the masks act on them, not on the energies). The
    official code runs two backward passes; with `one_backward` both go through one batched backward
    (`is_grads_batched`: the graph is walked once with a batch of two cotangents), same numbers.
    """
    latent = z.detach().requires_grad_(True)
    with torch.enable_grad(), controller.use(PLAIN):
        gen = backbone.features(latent, t, cond)
        counts.feature_grad += 1
        e_edit, e_content = task.energies(gen, ref_features)
        terms = [(k, e) for k, e in enumerate((e_edit, e_content)) if e is not None]
        grads = [torch.zeros_like(latent), torch.zeros_like(latent)]
        # s multiplies the energy before autograd, as in the official code (matters in fp16).
        if one_backward and len(terms) == 2:
            scaled = torch.stack([task.energy_scale * e for _, e in terms])
            (both,) = torch.autograd.grad(scaled, latent, grad_outputs=torch.eye(2, dtype=scaled.dtype,
                                                                                   device=scaled.device),
                                          is_grads_batched=True)
            grads = [both[0], both[1]]
            counts.backward += 1
        else:
            for n, (k, energy) in enumerate(terms):
                (grads[k],) = torch.autograd.grad(task.energy_scale * energy, latent,
                                                  retain_graph=n < len(terms) - 1)
                counts.backward += 1
    m = task.edit_region.to(z)
    g = task.gradient_coef * (grads[0] * m + grads[1] * (1 - m))
    energies = tuple(float("nan") if e is None else float(e.detach()) for e in (e_edit, e_content))
    return g.detach(), energies


@torch.no_grad()
def _reference_features(backbone, ref_latent, i: int, t: int, cond, controller, counts: PassCounts,
                        cache, cacheable: bool) -> list[list[torch.Tensor]]:
    """Features of each reference latent (batch element) at step i. Element 0 comes from / goes into `cache` when
    cacheable; the elements still to compute run as one batch (one pass instead of one per image)."""
    use_cache = cache is not None and cacheable
    out: list[list[torch.Tensor] | None] = [None] * ref_latent.shape[0]
    if use_cache and i in cache.steps:
        out[0] = [f.to(ref_latent.device, non_blocking=True) for f in cache.steps[i]]
        counts.feature_cached += 1
    todo = [b for b, feats in enumerate(out) if feats is None]
    if todo:
        with controller.use(PLAIN):
            batch = backbone.features(ref_latent[todo], t, backbone.cat_cond([cond] * len(todo)))
        counts.feature_nograd += len(todo)
        for j, b in enumerate(todo):
            out[b] = [f[j : j + 1] for f in batch]
        if use_cache and todo[0] == 0:
            cache.steps[i] = [f.detach().to(cache.device, copy=True) for f in out[0]]
    return out


@dataclass
class SamplingRecord:
    latents: list[torch.Tensor] = field(default_factory=list)  # after every step (last repeat)
    guidance: list[tuple[int, int, torch.Tensor]] = field(default_factory=list)  # (i, repeat, g)
    energies: list[tuple[int, int, float, float]] = field(default_factory=list)  # (i, repeat, E_edit, E_content)
    eps_cfg: list[tuple[int, int, torch.Tensor]] = field(default_factory=list)


def sample(backbone, task: Task, preset: Preset, schedule: Schedule, z_t: torch.Tensor, inverted: torch.Tensor,
           ref_t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, controller: BankController,
           counts: PassCounts, *, sde_strength: float, generator: torch.Generator | None,
           record: bool = False, step_callback: Callable | None = None, progress=None,
           should_stop: Callable[[], bool] | None = None, ref_cache=None,
           one_backward: bool = True):
    """Guided DDIM sampling from z_T. `inverted` is the (n+1, B, ...) inversion; `ref_t` replaces inverted[n] as
    the step-0 reference latent (drag's patched z_T). `should_stop()` is asked after every step (and its
    callback): True ends sampling there. `ref_cache` (an inversion's `FeatureCache` for this prompt) supplies the
    reference features of batch element 0 that a previous edit of the same inversion computed, and keeps new ones.
    Returns (final latent, SamplingRecord)."""
    n = len(schedule.timesteps)
    rec = SamplingRecord()
    z = z_t
    cfg_context = backbone.cat_cond([uncond, cond])
    sde_mask = task.sde_region.to(z)
    for i, t in enumerate(schedule.timesteps):
        step = schedule.grid_step(i)
        guided = task.energy_scale != 0 and preset.is_guided(step)
        repeats = preset.repeats(step) if guided else 1
        t_prev = schedule.prev(i)
        a_t, a_prev = schedule.alpha(t), schedule.alpha(t_prev)
        ref_features = None
        for r in range(repeats):
            with torch.no_grad(), controller.use(task.bank_mode_at(step), step=i), counts.watch.phase("cfg"):
                eps_u, eps_c = backbone.eps(torch.cat([z, z]), t, cfg_context).chunk(2)
            counts.cfg_unet += 1
            eps = eps_u + task.guidance_scale * (eps_c - eps_u)
            if record:
                rec.eps_cfg.append((i, r, eps))
            eps_hat = eps
            if guided:
                if ref_features is None:  # identical for every repeat of a step: computed once
                    with counts.watch.phase("reference_features"):
                        ref_features = _reference_features(backbone, ref_t if i == 0 else inverted[n - i], i, t,
                                                           cond, controller, counts, ref_cache,
                                                           cacheable=i > 0 or torch.equal(ref_t[:1], inverted[n][:1]))
                with counts.watch.phase("guidance"):
                    g, energies = guidance(backbone, task, z, ref_features, t, cond, controller, counts,
                                           one_backward)
                eps_hat = eps + preset.guidance_gain * g
                if record:
                    rec.guidance.append((i, r, g))
                rec.energies.append((i, r) + energies)
            # DDIM: guided eps for x0, unguided eps for the direction (as the official code).
            z_prev = ddim_step(z, eps_hat, a_t, a_prev, eps_dir=eps)
            if sde_strength > 0 and preset.has_sde(step):
                noise = torch.randn(z.shape, generator=generator, device=generator.device if generator else z.device)
                base = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
                sigma = sde_strength * base.sqrt()
                # Outside the region eta = 0: plain DDIM; inside: DDIM with noise sigma.
                z_sde = ddim_step(z, eps_hat, a_t, a_prev, eps_dir=eps, sigma=sigma, noise=noise.to(z))
                z_prev = (1 - sde_mask) * z_prev + sde_mask * z_sde
            if r < repeats - 1:
                # Time travel: deterministic re-noising back to t with eps at the source timestep t_prev,
                # cond only, no bank. The official code also re-noises after the last repeat and discards it.
                t_src = t_prev
                with torch.no_grad(), controller.use(PLAIN), counts.watch.phase("time_travel"):
                    eps_src = backbone.eps(z_prev, t_src, cond)
                counts.time_travel_unet += 1
                z = time_travel(z_prev, eps_src, schedule.alpha(t_src), a_t)
            else:
                z = z_prev
        if not torch.isfinite(z).all():
            raise NonFiniteError(
                f"NaN/Inf in the latent after sampling step {i} (t={t}); lower energy_scale or use float32"
            )
        if step_callback is not None:
            z = step_callback(i, t, z)
        if record:
            rec.latents.append(z)
        if progress is not None:
            progress.update(1)
        if should_stop is not None and should_stop():
            break
    return z, rec
