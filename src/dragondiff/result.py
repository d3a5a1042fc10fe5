"""What an edit returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image


@dataclass
class EditResult:
    """The edited image at the working resolution, the inputs as used, and optional intermediates.

    With `return_intermediates=True`:
      inverted_latents  (n+1, B, 4, h, w): [0] = clean latent, [k] at timestep t_{n-k}; B = 2 for two-image tasks
      z_T               (1, 4, h, w) after the task's initialisation
      latents           (n, 1, 4, h, w): the latent after every sampling step (last repeat of a repeated step)
      guidance          list of (step i, repeat r, g) for every guidance evaluation, g = what is added to eps
      eps_cfg           list of (step i, repeat r, CFG eps before g is added)
    `energies` (step, repeat, E_edit, E_content) before the energy scale, and `pass_counts`, are always filled.
    """

    image: Image.Image
    task: str
    preset: str
    input_image: Image.Image
    reference_image: Image.Image | None
    masks: dict[str, np.ndarray]
    edit_area: np.ndarray | None  # (H, W) bool at the working size: where the edit may change the image
    input_scale: tuple[float, float]  # (x, y): working size / original size
    energies: list[tuple[int, int, float, float]]
    pass_counts: dict[str, int]
    flags: list[str] = field(default_factory=list)
    spec: object = None  # the resolved EditSpec (every default filled in): re-run it with pipe.edit(spec)
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase: inversion, sampling, decode
    # finer phases: encode, inversion, cfg, reference_features, guidance, time_travel, decode (exact on CUDA
    # only with pipe.precise_timings, which synchronises at each boundary)
    phases: dict[str, float] = field(default_factory=dict)
    inverted_latents: torch.Tensor | None = None
    z_T: torch.Tensor | None = None
    latents: torch.Tensor | None = None
    guidance: list[tuple[int, int, torch.Tensor]] | None = None
    eps_cfg: list[tuple[int, int, torch.Tensor]] | None = None
    # Tasks that edit a crop of the photo (face): the result put back into the photo at its full size.
    photo: Image.Image | None = None
    # Landmark tasks (face): {"handles", "targets"} on the aligned crop (its pixels, 1024 px), "photo": the face's
    # landmarks in the photo's pixels.
    landmarks: dict | None = None
    # With a compiled UNet (pipe.enable_compile): backend, mode, the graphs this edit compiled (0 once warm) and how
    # many compiled graphs it loaded from torch's on-disk caches (`cache_hits`: a later process at the same size).
    compiled: dict | None = None

    @property
    def settings(self) -> dict:
        """guidance_scale and energy_scale (slider units) as used ({} for `reconstruct`, which has no spec)."""
        if self.spec is None:
            return {}
        return {"guidance_scale": self.spec.guidance_scale, "energy_scale": self.spec.energy_scale}

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the working resolution."""
        return self.image.size
