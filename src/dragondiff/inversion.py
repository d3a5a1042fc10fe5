"""A reusable inversion: what `DragonPipeline.invert` returns and every task accepts in place of its image.

An interactive user edits the same picture many times; its 50-step DDIM inversion and the memory bank captured
during it depend only on the image, the prompt, the working size and the step count, so they are computed once
and handed back to each edit (`pipe.move(inv, mask, ...)`). The latents live on the CPU, and so does the bank
(or on the pipeline's device when that is the CPU), so that keeping a few of them does not hold GPU memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .attention import MemoryBank


@dataclass
class FeatureCache:
    """Reference features (up_blocks[1] and [2] outputs of the inverted latent at step i) for one edit prompt.

    They depend only on the inversion, the step and the prompt, so the first edit of an inversion computes them
    and every later edit with that prompt reads them (the sampler's guided steps then skip one feature pass each).
    """

    device: torch.device
    steps: dict[int, list[torch.Tensor]] = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(f.numel() * f.element_size() for feats in self.steps.values() for f in feats)


@dataclass(frozen=True)
class Inversion:
    image: np.ndarray  # (H, W, 3) uint8 at the working size
    original_hw: tuple[int, int]
    max_resolution: int
    prompt: str
    num_inference_steps: int
    latents: torch.Tensor  # (n+1, 1, 4, h, w) fp32 on the CPU: [0] = clean latent, [k] at timestep t_{n-k}
    bank: MemoryBank  # decoder self-attention K/V per layer and step
    model_key: int  # id() of the UNet that made it: an inversion is only valid for that model
    dtype: torch.dtype
    features: dict[str, FeatureCache] = field(default_factory=dict, compare=False, repr=False)  # by edit prompt

    def feature_cache(self, prompt: str) -> FeatureCache:
        """The reference-feature cache of edits with this prompt (kept beside the bank)."""
        if prompt not in self.features:
            self.features[prompt] = FeatureCache(self.bank.storage_device)
        return self.features[prompt]

    @property
    def size_hw(self) -> tuple[int, int]:
        return self.image.shape[:2]

    @property
    def nbytes(self) -> int:
        """Memory held: the bank, the latents and the cached reference features."""
        return (self.bank.nbytes() + self.latents.numel() * self.latents.element_size()
                + sum(c.nbytes() for c in self.features.values()))

    def __repr__(self) -> str:
        h, w = self.size_hw
        return (f"Inversion({w}x{h} working px, {self.num_inference_steps} steps, prompt={self.prompt!r}, "
                f"{self.nbytes / 2**20:.1f} MiB)")


def merge_banks(banks: list[MemoryBank], device: torch.device) -> MemoryBank:
    """One bank whose batch holds the images of `banks` in order (base, then reference)."""
    if len(banks) == 1:
        return banks[0]
    merged = MemoryBank(device)
    for layer in banks[0].layers():
        for step in banks[0].steps(layer):
            parts = [b.entries[layer][step] for b in banks]
            merged.store(layer, step, torch.cat([k.to(device) for k, _ in parts]),
                         torch.cat([v.to(device) for _, v in parts]))
    return merged
