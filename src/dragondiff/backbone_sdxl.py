"""Stable Diffusion XL as a backbone: the same explicit UNet forward as SD1.x, with SDXL's conditioning.

What differs from SD1.x, and how it is handled here:
- Two text encoders: CLIP ViT-L (`text_encoder`) and OpenCLIP ViT-bigG with a projection (`text_encoder_2`). As
  diffusers' SDXL pipeline builds it, the token features are the penultimate hidden states of both, concatenated
  (768 + 1280 = 2048 channels), and the pooled embedding is the second encoder's projected output.
- Added conditions: that pooled embedding and six "time ids", (original h, w, crop top, left, target h, w), which we
  make from the working size with no crop: the image is neither cropped nor resized by the edit. Both travel in
  `Conditioning.added` ("text_embeds", "time_ids"), the names the UNet's `added_cond_kwargs` reads.
- The unconditional branch is zeros (text and pooled) when the model asks for it (`force_zeros_for_empty_prompt`,
  true for SDXL base), as diffusers does when no negative prompt is given; else the empty prompt.
- Three resolution levels instead of four: the decoder outputs at 1/2 and 1/1 of the latent resolution (the ones
  SD1's official feature layers are) are up_blocks[0] and [1]. The memory bank covers the decoder self-attention
  layers at those resolutions: up_blocks[1]'s (6 layers at 1/2; up_blocks[2] at 1/1 has no attention). The 30
  layers of up_blocks[0] work at 1/4 and are left plain: at 1024 px they would hold 2.5x the bank (docs/backbones.md).
- The VAE overflows in float16: with `force_upcast` in its config (SDXL's VAE has it) it runs in float32 whenever
  the model runs in float16. An fp16-safe VAE (force_upcast false, e.g. madebyollin/sdxl-vae-fp16-fix) runs in fp16.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch

from .backbone import Conditioning, SD1Backbone


class SDXLBackbone(SD1Backbone):
    """Stable Diffusion XL base: a UNet2DConditionModel with text-time added conditions, two text encoders."""

    NAME = "SDXL"
    SUPPORTS = ("SDXL base: a UNet2DConditionModel with addition_embed_type 'text_time' and 6 time ids, two text "
                "encoders (CLIPTextModel + CLIPTextModelWithProjection)")
    FEATURE_BLOCKS = (0, 1)
    BANK_BLOCKS = (1,)
    TIME_IDS = 6  # original size (2), crop corner (2), target size (2); the refiner's 5 carry an aesthetic score
    ACTIVATION_BYTES_PER_CELL = 9.05 * 2**30 / 128**2  # bench memory: 9.05 GiB at 1024 px in fp16

    def __init__(self, unet, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, *,
                 force_zeros_for_empty_prompt: bool = True):
        if text_encoder_2 is None or tokenizer_2 is None:
            raise ValueError("text_encoder_2: an SDXL model needs both text encoders and tokenizers (the refiner, "
                             "with only the second, is not supported)")
        cfg = unet.config
        pooled = text_encoder_2.config.projection_dim
        expected = self.TIME_IDS * cfg.addition_time_embed_dim + pooled
        if cfg.projection_class_embeddings_input_dim != expected:
            raise ValueError(
                f"unet: its added-condition input is {cfg.projection_class_embeddings_input_dim} wide; SDXL base with "
                f"this text encoder needs {self.TIME_IDS} time ids x {cfg.addition_time_embed_dim} + {pooled} pooled "
                f"= {expected} (a refiner's aesthetic-score ids are not supported)")
        width = text_encoder.config.hidden_size + text_encoder_2.config.hidden_size
        if cfg.cross_attention_dim != width:
            raise ValueError(f"unet: cross_attention_dim {cfg.cross_attention_dim} differs from the two text "
                             f"encoders' {text_encoder.config.hidden_size} + {text_encoder_2.config.hidden_size}")
        super().__init__(unet, vae, text_encoder, tokenizer)
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)

    # ------------------------------------------------------------------------------------------- loading

    @classmethod
    def accepts(cls, unet_config) -> bool:
        return (unet_config.get("addition_embed_type") == "text_time" and unet_config.get("in_channels", 4) == 4
                and unet_config.get("class_embed_type") is None)

    @classmethod
    def from_components(cls, unet, vae, text_encoder, tokenizer, text_encoder_2=None, tokenizer_2=None,
                        force_zeros_for_empty_prompt: bool = True):
        return cls(unet, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2,
                   force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)

    @classmethod
    def from_pretrained(cls, source: str, *, use_safetensors=True, local_files_only: bool = False):
        from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        common = {"local_files_only": local_files_only}
        weights = {"use_safetensors": use_safetensors, **common}
        from .weights import load_component

        unet = load_component(UNet2DConditionModel, source, "unet", "unet", **weights)
        vae = load_component(AutoencoderKL, source, "vae", "vae", **weights)
        text_encoder = load_component(CLIPTextModel, source, "text_encoder", "text_encoder", **weights)
        text_encoder_2 = load_component(CLIPTextModelWithProjection, source, "text_encoder_2", "text_encoder_2",
                                        **weights)
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **common)
        tokenizer_2 = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2", **common)
        try:
            index = DiffusionPipeline.load_config(source, **common)
        except (OSError, EnvironmentError, ValueError):
            index = {}
        return cls(unet, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2,
                   force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt", True))

    @property
    def modules(self) -> tuple[torch.nn.Module, ...]:
        base = super().modules
        return base[:3] + (self.text_encoder_2,) + base[3:]

    def module_dtype(self, module: torch.nn.Module, dtype: torch.dtype) -> torch.dtype:
        """float32 for a VAE that overflows in float16 (`force_upcast`, as diffusers' SDXL pipelines decide)."""
        if module is self.vae and dtype == torch.float16 and getattr(self.vae.config, "force_upcast", False):
            return torch.float32
        return dtype

    def describe(self) -> dict:
        return {**super().describe(), "vae_dtype": str(self.vae.dtype).replace("torch.", "")}

    # ------------------------------------------------------------------------------------------- encoders

    @torch.no_grad()
    def condition(self, prompts: Sequence[str], size_hw: tuple[int, int] | None = None) -> Conditioning:
        """Both encoders' penultimate hidden states (B, 77, 2048), the pooled embedding and the time ids of the
        working size `size_hw` (required: SDXL is conditioned on the image size)."""
        if size_hw is None:
            raise ValueError("size_hw: SDXL's conditioning needs the working size (its time ids)")
        prompts = self._check_prompts(prompts)
        hidden, pooled = [], None
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids
            out = encoder(ids.to(self.device), output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:  # the projected text embedding (the second encoder's)
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        h, w = (int(v) for v in size_hw)
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32, device=self.device)
        return Conditioning(text=torch.cat(hidden, dim=-1).float(),
                            added={"text_embeds": pooled.float(), "time_ids": time_ids.repeat(len(prompts), 1)})

    def unconditional(self, size_hw: tuple[int, int] | None = None, n: int = 1) -> Conditioning:
        cond = self.condition([""] * n, size_hw)
        if not self.force_zeros_for_empty_prompt:
            return cond
        return replace(cond, text=torch.zeros_like(cond.text),
                       added={**cond.added, "text_embeds": torch.zeros_like(cond.added["text_embeds"])})

    def prompt_length(self, prompt: str) -> int:
        return max(super().prompt_length(prompt), len(self.tokenizer_2(prompt, truncation=False).input_ids))
