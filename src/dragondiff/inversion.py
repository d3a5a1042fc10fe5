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

    @property
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
        return (self.bank.nbytes + self.latents.numel() * self.latents.element_size()
                + sum(c.nbytes for c in self.features.values()))

    def __repr__(self) -> str:
        h, w = self.size_hw
        return (f"Inversion({w}x{h} working px, {self.num_inference_steps} steps, prompt={self.prompt!r}, "
                f"{self.nbytes / 2**20:.1f} MiB)")


class MergedBank:
    """Several banks read as one whose batch holds their images in order (base, then reference). Entries are
    concatenated per read, for the one step and layer in use, instead of copying every bank into a new one: a
    reused inversion's bank is then not held twice during a two-image edit."""

    def __init__(self, banks: list[MemoryBank]):
        self.banks = banks
        self.storage_device = banks[0].storage_device

    def get(self, layer: str, step: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [b.get(layer, step, device) for b in self.banks]
        return torch.cat([k for k, _ in parts]), torch.cat([v for _, v in parts])

    def store(self, layer, step, key, value):
        raise RuntimeError("a merged bank is read-only: capture into each image's own bank")

    def layers(self) -> list[str]:
        return self.banks[0].layers()

    def steps(self, layer: str) -> list[int]:
        return self.banks[0].steps(layer)

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.banks)


def merge_banks(banks: list[MemoryBank]) -> MemoryBank | MergedBank:
    """One bank whose batch holds the images of `banks` in order (base, then reference)."""
    return banks[0] if len(banks) == 1 else MergedBank(banks)
