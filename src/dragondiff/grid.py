"""`Grid`: the three resolutions of an edit and the factors between them, in one place.

image (working size, H x W) --/vae_factor--> latent (h x w) --x feature_factor--> feature grid (the resolution the
energies compare features at; on SD1.x twice the latent size, i.e. H/4; on SD3 and FLUX one cell per 2x2-cell
patch token, a factor 1/2, i.e. H/16). Both factors come from the backbone
(`backbone.vae_factor`, read from the VAE's configuration, and `backbone.feature_factor`).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction


@dataclass(frozen=True)
class Grid:
    image_hw: tuple[int, int]
    vae_factor: int
    feature_factor: int | Fraction  # a patchified transformer's grid is coarser than the latent: 1/patch

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.image_hw[0] // self.vae_factor, self.image_hw[1] // self.vae_factor

    @property
    def feature_hw(self) -> tuple[int, int]:
        h, w = self.latent_hw
        return int(self.feature_factor * h), int(self.feature_factor * w)

    def scaled_feature_hw(self, scale: float) -> tuple[int, int]:
        """The feature grid scaled by `scale` (truncated), e.g. the move task's resized reference canvas."""
        h, w = self.feature_hw
        return int(h * scale), int(w * scale)

    @property
    def feature_cell(self) -> int:
        """Image pixels per feature cell (4 on SD1.x)."""
        return self.vae_factor // self.feature_factor

    def feature_to_latent(self, index: int) -> int:
        return int(index // self.feature_factor)
