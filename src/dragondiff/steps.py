"""Step rules over a continuous schedule: how the sampler moves a latent from one noise level to the next.

Every rule here writes a noisy latent as z = a·x0 + b·ε at a noise level, and turns the model's prediction at that
level into the pair (x̂0, ε̂). One step to the next level is then z' = a'·x̂0 + b'·ε̂, whichever way it goes:
sampling (to a less noisy level), inversion (to a noisier one, the prediction made at the destination's time) and
time travel (back to a noisier level with the prediction made at the source). The guided sampler takes x̂0 from the
guided prediction and ε̂ from the unguided one (the official code's DDIM update), and guidance is added in the
rule's `space`: ε for DDIM, the velocity v for flow matching.

- `DDIMRule` (SD1.x, SD2.x, SDXL): levels are ᾱ (a = √ᾱ, b = √(1−ᾱ)); the model's ε (a v model's prediction is
  turned into ε by its backbone). The arithmetic is the one the parity runs were made with, kept op for op.
- `FlowEulerRule` (SD3, FLUX): levels are σ of `FlowMatchEulerDiscreteScheduler` (shift included; a = 1−σ, b = σ);
  the model's v, x̂0 = z − σ·v and ε̂ = z + (1−σ)·v, so that the unguided step is exactly Euler's z + (σ'−σ)·v.

A `Schedule` holds the model times of the n steps, the n+1 levels (level i before step i, level n the end) and its
rule. Preset windows are fractions of the trajectory: step i of n sits at i/n, read on the official 50-step grid as
grid step ⌊50·i/n⌋ (the official windows map exactly).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Schedule:
    """The n steps of an edit: `timesteps[i]` is what the model is called with at step i (DDIM's integer t, flow
    matching's σ·1000), `levels[i]` the noise level there (ᾱ or σ, 0-d fp32 tensors), `levels[n]` the level after
    the last step, `end_time` the model time of that end point (DDIM: -1, the official code's time-travel source
    after its last step; flow: 0)."""

    rule: "DDIMRule | FlowEulerRule"
    timesteps: list
    levels: list[torch.Tensor]
    end_time: float | int

    def __len__(self) -> int:
        return len(self.timesteps)

    def time_after(self, i: int):
        """The model time of the point after step i (the next, less noisy one)."""
        return self.timesteps[i + 1] if i + 1 < len(self.timesteps) else self.end_time

    def fraction(self, i: int) -> float:
        """How far along the trajectory step i starts (0 at the first step)."""
        return i / len(self.timesteps)

    def grid_step(self, i: int) -> int:
        """Step i on the 50-step grid the presets' windows are written on: ⌊50·i/n⌋ (integer arithmetic)."""
        return i * 50 // len(self.timesteps)


class DDIMRule:
    """DDIM over ᾱ: the official code's update, η = 0 except in the regional SDE's stochastic step."""

    NAME = "ddim"
    space = "eps"  # the prediction guidance is added to

    def __init__(self, scheduler_config):
        from diffusers import DDIMScheduler

        self.config = DDIMScheduler.from_config(scheduler_config).config
        self.train_steps = int(self.config.num_train_timesteps)

    def scheduler(self):
        from diffusers import DDIMScheduler

        return DDIMScheduler.from_config(self.config)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.scheduler().alphas_cumprod.to(torch.float32)

    def schedule(self, num_steps: int, latent_hw: tuple[int, int] | None = None) -> Schedule:
        """The DDIM timesteps of an n-step edit and their ᾱ; refused when they would pass the training steps."""
        scheduler = self.scheduler()
        timesteps = self._timesteps(scheduler, num_steps)
        if max(timesteps) >= self.train_steps:  # checked before any model work
            most = next(k for k in range(num_steps - 1, 0, -1)
                        if max(self._timesteps(self.scheduler(), k)) < self.train_steps)
            raise ValueError(f"num_inference_steps={num_steps}: this scheduler's timesteps would pass its "
                             f"{self.train_steps} training steps; use at most {most}")
        alphas = scheduler.alphas_cumprod.to(torch.float32)
        final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float32)
        return Schedule(self, timesteps, [alphas[t] for t in timesteps] + [final], -1)

    @staticmethod
    def _timesteps(scheduler, num_steps: int) -> list[int]:
        scheduler.set_timesteps(num_steps)
        return [int(t) for t in scheduler.timesteps]

    # a_* are ᾱ values (0-d tensors)
    @staticmethod
    def x0(z, pred, a_t):
        return (z - (1 - a_t).sqrt() * pred) / a_t.sqrt()

    def step(self, z, pred_x0, a_t, a_next, pred_dir=None, sigma=None, noise=None):
        """z at a_t -> z at a_next: x̂0 from `pred_x0`, the direction from `pred_dir` (default the same); with sigma
        and noise the stochastic DDIM step."""
        pred_dir = pred_x0 if pred_dir is None else pred_dir
        x0 = self.x0(z, pred_x0, a_t)
        if sigma is None:
            return a_next.sqrt() * x0 + (1 - a_next).sqrt() * pred_dir
        return a_next.sqrt() * x0 + (1 - a_next - sigma**2).sqrt() * pred_dir + sigma * noise

    def invert(self, z, pred, a_from, a_to):
        """z at a_from -> the noisier a_to, with the prediction made at the destination's time."""
        return a_to.sqrt() * self.x0(z, pred, a_from) + (1 - a_to).sqrt() * pred

    def renoise(self, z, pred_src, a_src, a_to):
        """Time travel: z at a_src back to a_to with the prediction made at the source."""
        return a_to.sqrt() * self.x0(z, pred_src, a_src) + (1 - a_to).sqrt() * pred_src

    @staticmethod
    def sde_sigma(strength: float, a_t, a_next):
        """The noise of the stochastic step: η times DDPM's posterior standard deviation."""
        base = (1 - a_next) / (1 - a_t) * (1 - a_t / a_next)
        return strength * base.sqrt()


class FlowEulerRule:
    """Rectified flow (z = (1−σ)·x0 + σ·ε, v = ε − x0) with Euler steps over the scheduler's shifted σ."""

    NAME = "flow-euler"
    space = "v"

    def __init__(self, scheduler_config):
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.config = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config).config

    def scheduler(self):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(self.config)

    def mu(self, tokens: int) -> float:
        """FLUX's resolution-dependent shift: log-shift interpolated linearly in the image's token count."""
        c = self.config
        slope = (c.max_shift - c.base_shift) / (c.max_image_seq_len - c.base_image_seq_len)
        return tokens * slope + c.base_shift - slope * c.base_image_seq_len

    def schedule(self, num_steps: int, latent_hw: tuple[int, int] | None = None) -> Schedule:
        """The σ of diffusers' pipelines, then 0: with a fixed shift (SD3) the scheduler's own n steps; with a
        resolution-dependent one (FLUX) σ from 1 down to 1/n, shifted by `mu` of the image's 2x2-token count."""
        import numpy as np

        scheduler = self.scheduler()
        if self.config.get("use_dynamic_shifting", False):
            if latent_hw is None:
                raise ValueError("latent_hw: a dynamically shifted flow schedule depends on the image size")
            mu = self.mu(math.ceil(latent_hw[0] / 2) * math.ceil(latent_hw[1] / 2))
            scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
        else:
            scheduler.set_timesteps(num_steps)
        levels = [s.to(torch.float32) for s in scheduler.sigmas]
        return Schedule(self, [float(t) for t in scheduler.timesteps], levels, 0.0)

    @staticmethod
    def x0(z, v, s):
        return z - s * v

    @staticmethod
    def noise(z, v, s):
        return z + (1 - s) * v

    def step(self, z, pred_x0, s, s_next, pred_dir=None, sigma=None, noise=None):
        pred_dir = pred_x0 if pred_dir is None else pred_dir
        x0, eps = self.x0(z, pred_x0, s), self.noise(z, pred_dir, s)
        if sigma is None:
            return (1 - s_next) * x0 + s_next * eps
        return (1 - s_next) * x0 + (s_next**2 - sigma**2).clamp(min=0).sqrt() * eps + sigma * noise

    def invert(self, z, pred, s_from, s_to):
        return (1 - s_to) * self.x0(z, pred, s_from) + s_to * self.noise(z, pred, s_from)

    renoise = invert

    @staticmethod
    def sde_sigma(strength: float, s, s_next):
        """η times the posterior standard deviation of z at s_next given z at s and x0 (a = 1−σ, b = σ):
        b'·√(1 − (a·b' / (a'·b))²)."""
        a, a_next = 1 - s, 1 - s_next
        ratio = (a * s_next / (a_next * s)).clamp(max=1.0) if float(s) > 0 and float(a_next) > 0 else s * 0
        return strength * s_next * (1 - ratio**2).sqrt()


RULES = {rule.NAME: rule for rule in (DDIMRule, FlowEulerRule)}
