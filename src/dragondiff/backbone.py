"""The model behind the sampler: every call the inversion, the guided sampler and the feature passes make.

The sampler never touches a UNet directly; it asks a backbone for ε, for guidance features, for prompt and image
encodings and for decoding, in the spirit of k-diffusion's `model(x, sigma, **extra_args)`. `cond` is opaque to
the sampler (it only batches conds with `cat_cond` and slices them by batch), so a backbone with extra
conditioning (SDXL's pooled text embedding and size ids, a DiT's class label) fits the same loop.
`SD1Backbone` is the first implementation: a stock diffusers `UNet2DConditionModel`, `AutoencoderKL` and CLIP text
encoder, changed only through attention processors (the memory bank) and forward hooks (the feature pass).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Sequence

import numpy as np
import torch

from .attention import bank_processors, decoder_self_attention_names
from .features import FEATURE_BLOCKS, extract_features


class SD1Backbone:
    def __init__(self, unet, vae, text_encoder, tokenizer):
        if len(getattr(unet, "up_blocks", [])) < 3:
            raise ValueError("unet: expected an SD1.x-style UNet2DConditionModel with at least 3 up blocks")
        decoder_self_attention_names(unet)
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def vae_factor(self) -> int:
        """Pixels per latent cell, from the VAE's configuration (as diffusers' `vae_scale_factor`)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    # ------------------------------------------------------------------------------------ the sampler's calls

    def eps(self, z: torch.Tensor, t, cond: torch.Tensor) -> torch.Tensor:
        """ε prediction in fp32, whatever the model's dtype."""
        out = self.unet(z.to(self.unet.dtype), t, encoder_hidden_states=cond.to(self.unet.dtype), return_dict=False)
        return out[0].float()

    def features(self, z: torch.Tensor, t, cond: torch.Tensor, layers=FEATURE_BLOCKS) -> list[torch.Tensor]:
        """Guidance features (outputs of the given up blocks) at their native resolutions; differentiable."""
        if tuple(layers) != FEATURE_BLOCKS:
            raise ValueError(f"layers: SD1Backbone extracts up_blocks {FEATURE_BLOCKS}, got {layers}")
        return extract_features(self.unet, z, t, cond)

    @staticmethod
    def cat_cond(conds: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat(list(conds))

    @contextmanager
    def memory_bank(self, controller):
        """Route the decoder self-attention K/V through a bank controller for the duration of the block."""
        with bank_processors(self.unet, controller):
            yield

    # ----------------------------------------------------------------------------------------- encoders

    @torch.no_grad()
    def encode_prompt(self, prompts: Sequence[str]) -> torch.Tensor:
        """(B, 77, C) last hidden states, padded to the tokenizer's max length (SD conditioning)."""
        for k, p in enumerate(prompts):
            if not isinstance(p, str):
                raise TypeError(f"prompt: expected a string, got {type(p).__name__} (prompt #{k})")
        limit = self.tokenizer.model_max_length
        tokens = self.tokenizer(list(prompts), padding="max_length", max_length=limit, truncation=True,
                                return_tensors="pt")
        return self.text_encoder(tokens.input_ids.to(self.device))[0].float()

    def prompt_length(self, prompt: str) -> int:
        """Tokens of a prompt with its start/end tokens (what must fit in the text encoder's window)."""
        return len(self.tokenizer(prompt, truncation=False).input_ids)

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """VAE posterior mean x scaling factor (deterministic, as the official code)."""
        latent = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist.mean
        return latent.float() * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> np.ndarray:
        """(1, 4, h, w) latent -> (H, W, 3) uint8."""
        from .sampler import NonFiniteError

        x = self.vae.decode((latent / self.vae.config.scaling_factor).to(self.vae.dtype), return_dict=False)[0]
        if not torch.isfinite(x).all():
            raise NonFiniteError(f"NaN/Inf in the VAE decode ({self.vae.dtype}); try dtype=torch.float32 for the VAE")
        x = (x.float() / 2 + 0.5).clamp(0, 1)
        return (x[0].permute(1, 2, 0).cpu().numpy() * 255.0).round().astype(np.uint8)
