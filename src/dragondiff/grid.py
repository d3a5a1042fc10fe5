"""`Grid`: the three resolutions of an edit and the factors between them, in one place.

image (working size, H x W) --/vae_factor--> latent (h x w) --x2--> feature grid (the resolution the energies
compare features at: outputs of up_blocks[1] and [2] resized to twice the latent size, i.e. H/4 on SD1.x).
The VAE factor is read from the model (8 for SD1.x/SDXL VAEs), as diffusers' `vae_scale_factor`.
"""

from __future__ import annotations

from dataclasses import dataclass

FEATURES_PER_LATENT = 2  # the official code resizes both feature maps to 2x the latent resolution


@dataclass(frozen=True)
class Grid:
    image_hw: tuple[int, int]
    vae_factor: int = 8

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.image_hw[0] // self.vae_factor, self.image_hw[1] // self.vae_factor

    @property
    def feature_hw(self) -> tuple[int, int]:
        h, w = self.latent_hw
        return FEATURES_PER_LATENT * h, FEATURES_PER_LATENT * w

    @property
    def feature_cell(self) -> int:
        """Image pixels per feature cell (4 on SD1.x)."""
        return self.vae_factor // FEATURES_PER_LATENT

    def feature_to_latent(self, index: int) -> int:
        return index // FEATURES_PER_LATENT
