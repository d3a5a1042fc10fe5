"""Inversion with memory-bank capture, and the guided sampler, over a schedule and its step rule (`steps`).

The loop is written once for every model family: the step math (DDIM over ᾱ, flow-matching Euler over σ) is the
schedule's rule, and guidance is added to the model's prediction in the rule's space (ε or v).
Latents are kept in fp32 whatever the model dtype; the network sees them cast to its dtype. All per-edit state is in
the arguments. The sampler's whole contract with the layers around it is written here: the model it calls
(`Model`: a backbone), what it asks of a task (`GuidedTask`), the guidance settings as one value (`Guidance`), the
problem and the per-edit state (`Problem`, `EditState`), and one per-step hook (`on_step(StepInfo)`) through which
callers see, replace or stop the latent, record intermediates and report progress.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from .attention import CAPTURE, PLAIN, BankController
from .errors import NonFiniteError
from .presets import Preset
from .steps import Schedule


class Model(Protocol):
    """What the sampler calls (a backbone). `predict` returns the prediction the schedule's rule reads (ε for the
    DDIM backbones, v for the flow-matching ones), fp32. `cond` values come from the model's own `condition` and
    are batched with `type(cond).cat` and `cond.repeat`, and weighted with `cond.with_image_scale` / stripped of image tokens
    with `cond.text_only()`; the sampler never looks inside them."""

    def predict(self, z: torch.Tensor, t, cond) -> torch.Tensor: ...

    def features(self, z: torch.Tensor, t, cond) -> list[torch.Tensor]: ...


class GuidedTask(Protocol):
    """What the sampler asks of a task: its energies, where their gradients apply, its bank mode."""

    edit_region: torch.Tensor  # (1, 1, h, w) M: the edit gradient inside, the content gradient outside
    sde_region: torch.Tensor  # (1, 1, h, w) where the regional SDE adds noise
    bank_mode: str  # the memory-bank mode inside the guidance's bank window

    def energies(self, gen: list[torch.Tensor], refs: list[list[torch.Tensor]]): ...


@dataclass(frozen=True)
class Guidance:
    """Every strength of an edit in one value, built by the pipeline: CFG, the energy scale s (the demo's slider
    value x1000), the gradient factor c and the preset's gain on it, the regional SDE's eta, the bank window."""

    cfg_scale: float
    energy_scale: float  # s: multiplies each energy before autograd
    gradient_coef: float  # c: multiplies the masked gradient
    gain: float = 1.0  # the preset's factor on c·gradient (fewer guided steps need more per step)
    sde_strength: float = 0.0
    bank_window: tuple[int, int | None] = (0, None)  # (first, last) grid steps using the bank; last None: to the end
    ip_scale: float = 0.0  # weight of the image-prompt term inside the preset's window (with image tokens)

    @property
    def guided(self) -> bool:
        return self.energy_scale != 0

    def bank_mode_at(self, mode: str, grid_step: int) -> str:
        first, last = self.bank_window
        return mode if first <= grid_step and (last is None or grid_step <= last) else PLAIN


@dataclass
class Problem:
    """What to sample: from z_T with the task's energies against the inversion's reference latents."""

    task: GuidedTask
    guidance: Guidance
    z_t: torch.Tensor  # (1, 4, h, w) starting latent
    inverted: torch.Tensor  # (n+1, B, 4, h, w) the inversion
    ref_t: torch.Tensor  # (B, 4, h, w) the step-0 reference latents (drag patches inv[T])
    cond: object  # the edit prompt's conditioning (sampling and feature passes)
    uncond: object  # the unconditional branch's


@dataclass
class EditState:
    """Per-edit state the sampler uses and updates: the bank controller, counters, the noise generator, the
    reference-feature cache of a reused inversion, and whether both gradients share one backward."""

    controller: BankController
    counts: "PassCounts"
    generator: torch.Generator | None = None
    ref_cache: object = None
    one_backward: bool = True


@dataclass
class StepInfo:
    """What `on_step` sees after sampling step i. It may set `latent` (same shape) to change what the next step
    starts from, and `stop` to end sampling there. `eps_cfg` (the CFG-combined prediction, in the rule's space: ε or
    v) and `gradients` hold one tensor per repeat."""

    i: int
    t: int | float
    latent: torch.Tensor
    eps_cfg: list[torch.Tensor]
    gradients: list[torch.Tensor]  # g of each guided repeat (before the preset's gain)
    energies: list[tuple[float, float]]  # (E_edit, E_content) of each guided repeat
    stop: bool = False


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
    """Network work done by one edit (the `_unet` names are kept for every network: they are in earlier results'
    sidecars). Feature passes are truncated after the last feature block. `watch` times the phases."""

    inversion_unet: int = 0  # batch = number of inverted images
    cfg_unet: int = 0  # batch 2 (uncond, cond), or 1 when the model embeds its guidance and CFG is 1
    time_travel_unet: int = 0  # batch 1
    feature_nograd: int = 0  # batch 1, reference features (computed, not taken from an inversion's cache)
    feature_cached: int = 0  # reference features taken from a reused inversion's cache
    feature_grad: int = 0  # batch 1, generation features
    backward: int = 0  # backward passes (one batched backward carries both energy terms)
    image_encoder: int = 0  # CLIP image-encoder passes of the image prompt (each image and its zero image)
    watch: Stopwatch = field(default_factory=Stopwatch, repr=False, compare=False)

    def as_dict(self) -> dict[str, int]:
        return {k: v for k, v in self.__dict__.items() if k != "watch"}


@torch.no_grad()
def invert(backbone, z0: torch.Tensor, context, schedule: Schedule, controller: BankController,
           counts: PassCounts) -> torch.Tensor:
    """Inversion, conditional only. Returns (n+1, B, C, h, w): [0] = z0, [k] at the level of step n-k.

    The prediction is made at the destination's time (the null-text-inversion convention the official code uses),
    and the bank layers' K/V of the call at step i's time are stored as bank step i (the official code's
    off-by-one, kept because the bank must match what the official sampler attends to).
    """
    n, rule = len(schedule), schedule.rule
    latents = [z0]
    z = z0
    for j in range(n):
        i = n - 1 - j
        with controller.use(CAPTURE, step=i), counts.watch.phase("inversion"):
            pred = backbone.predict(z, schedule.timesteps[i], context)
        counts.inversion_unet += 1
        z = rule.invert(z, pred, schedule.levels[i + 1], schedule.levels[i])
        latents.append(z)
    return torch.stack(latents)


def guidance(backbone: Model, task: GuidedTask, settings: Guidance, z: torch.Tensor, ref_features, t: int, cond,
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
            scaled = torch.stack([settings.energy_scale * e for _, e in terms])
            (both,) = torch.autograd.grad(scaled, latent, grad_outputs=torch.eye(2, dtype=scaled.dtype,
                                                                                   device=scaled.device),
                                          is_grads_batched=True)
            grads = [both[0], both[1]]
            counts.backward += 1
        else:
            for n, (k, energy) in enumerate(terms):
                (grads[k],) = torch.autograd.grad(settings.energy_scale * energy, latent,
                                                  retain_graph=n < len(terms) - 1)
                counts.backward += 1
    m = task.edit_region.to(z)
    g = settings.gradient_coef * (grads[0] * m + grads[1] * (1 - m))
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
            batch = backbone.features(ref_latent[todo], t, cond.repeat(len(todo)))
        counts.feature_nograd += len(todo)
        for j, b in enumerate(todo):
            out[b] = [f[j : j + 1] for f in batch]
        if use_cache and todo[0] == 0:
            cache.steps[i] = [f.detach().to(cache.device, copy=True) for f in out[0]]
    return out


def sample(backbone: Model, preset: Preset, schedule: Schedule, problem: Problem, state: EditState,
           on_step: Callable[[StepInfo], None] | None = None) -> tuple[torch.Tensor, list]:
    """Guided sampling from `problem.z_t`. At step 0 the reference latent is `problem.ref_t` (drag's patched
    z_T), after that the inversion's. `state.ref_cache` (a reused inversion's `FeatureCache` for this prompt)
    supplies the reference features of batch element 0 that an earlier edit computed, and keeps new ones.
    `on_step(StepInfo)` runs after every step. Returns (final latent, [(i, repeat, E_edit, E_content)])."""
    task, settings, inverted, cond = problem.task, problem.guidance, problem.inverted, problem.cond
    controller, counts = state.controller, state.counts
    n, rule = len(schedule), schedule.rule
    energies_log = []
    z = problem.z_t
    cond_only = settings.cfg_scale == 1 and getattr(backbone, "EMBEDDED_GUIDANCE", False)
    cfg_context = cond if cond_only else type(cond).cat([problem.uncond, cond])
    # Inversion, feature passes and time travel never read image-prompt tokens (the official ≤77-token rule).
    feature_cond, travel_cond = cond.text_only(), cond.with_image_scale(0.0)
    sde_mask = task.sde_region.to(z)
    for i, t in enumerate(schedule.timesteps):
        step = schedule.grid_step(i)
        guided = settings.guided and preset.is_guided(step)
        repeats = preset.repeats(step) if guided else 1
        level, level_next = schedule.levels[i], schedule.levels[i + 1]
        ref_features = None
        info = StepInfo(i, t, z, [], [], [])
        step_context = cfg_context.with_image_scale(settings.ip_scale if preset.ip_active(step) else 0.0)
        for r in range(repeats):
            with torch.no_grad(), controller.use(settings.bank_mode_at(task.bank_mode, step), step=i), \
                    counts.watch.phase("cfg"):
                if cond_only:  # a guidance-distilled model (FLUX.1-dev) without true CFG: one branch
                    eps = backbone.predict(z, t, step_context)
                else:
                    eps_u, eps_c = backbone.predict(torch.cat([z, z]), t, step_context).chunk(2)
            counts.cfg_unet += 1
            if not cond_only:
                eps = eps_u + settings.cfg_scale * (eps_c - eps_u)
            info.eps_cfg.append(eps)
            eps_hat = eps
            if guided:
                if ref_features is None:  # identical for every repeat of a step: computed once
                    with counts.watch.phase("reference_features"):
                        ref_latent = problem.ref_t if i == 0 else inverted[n - i]
                        cacheable = i > 0 or torch.equal(problem.ref_t[:1], inverted[n][:1])
                        ref_features = _reference_features(backbone, ref_latent, i, t, feature_cond, controller,
                                                           counts, state.ref_cache, cacheable=cacheable)
                with counts.watch.phase("guidance"):
                    g, energies = guidance(backbone, task, settings, z, ref_features, t, feature_cond, controller,
                                           counts, state.one_backward)
                eps_hat = eps + settings.gain * g
                info.gradients.append(g)
                info.energies.append(energies)
                energies_log.append((i, r) + energies)
            # The guided prediction gives x̂0, the unguided one the direction (the official code's DDIM update).
            z_prev = rule.step(z, eps_hat, level, level_next, pred_dir=eps)
            if settings.sde_strength > 0 and preset.has_sde(step):
                gen = state.generator
                noise = torch.randn(z.shape, generator=gen, device=gen.device if gen else z.device)
                sigma = rule.sde_sigma(settings.sde_strength, level, level_next)
                # Outside the region eta = 0: the plain step; inside: the stochastic step with noise sigma.
                z_sde = rule.step(z, eps_hat, level, level_next, pred_dir=eps, sigma=sigma, noise=noise.to(z))
                z_prev = (1 - sde_mask) * z_prev + sde_mask * z_sde
            if r < repeats - 1:
                # Time travel: deterministic re-noising back to step i's level with the prediction at the source
                # (the next point's time), cond only, no bank. The official code also re-noises after the last
                # repeat and discards it.
                with torch.no_grad(), controller.use(PLAIN), counts.watch.phase("time_travel"):
                    eps_src = backbone.predict(z_prev, schedule.time_after(i), travel_cond)
                counts.time_travel_unet += 1
                z = rule.renoise(z_prev, eps_src, level_next, level)
            else:
                z = z_prev
        if not torch.isfinite(z).all():
            raise NonFiniteError(
                f"NaN/Inf in the latent after sampling step {i} (t={t}); lower the guidance strength, the "
                "product of energy_scale, gradient_coef and the energy weights (w_edit, w_content, ...), or use "
                "float32"
            )
        if on_step is not None:
            info.latent = z
            on_step(info)
            if info.latent is not z:
                if not isinstance(info.latent, torch.Tensor) or info.latent.shape != z.shape:
                    raise TypeError(f"on_step: the latent must stay a tensor of shape {tuple(z.shape)}, got "
                                    f"{type(info.latent).__name__} {tuple(getattr(info.latent, 'shape', ()))}")
                z = info.latent.to(z)
            if info.stop:
                break
    return z, energies_log


@torch.no_grad()
def sample_text_to_image(backbone: Model, schedule: Schedule, z_t: torch.Tensor, cond, uncond,
                         cfg_scale: float) -> torch.Tensor:
    """Plain deterministic sampling (the schedule's rule) with classifier-free guidance from noise z_t (no bank, no energies): what the
    model generates from its prompts alone, used to check a model's quality."""
    z = z_t
    context = type(cond).cat([uncond, cond])
    for i, t in enumerate(schedule.timesteps):
        eps_u, eps_c = backbone.predict(torch.cat([z, z]), t, context).chunk(2)
        eps = eps_u + cfg_scale * (eps_c - eps_u)
        z = schedule.rule.step(z, eps, schedule.levels[i], schedule.levels[i + 1])
    return z
