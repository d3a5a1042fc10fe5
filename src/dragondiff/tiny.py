"""Random-weight components with SD1.5's exact block layout, built in code (no download).

- tiny: built in about a second; for tests (mechanics, shapes, dtypes, errors) and the smoke demo. Not a model
  that makes pictures: its outputs are deterministic noise-like colour fields.
- sd15-shaped: SD1.5's UNet and VAE at full size (860 M + 84 M parameters) with random weights, for the speed and
  memory benchmarks (compute does not depend on weight values). Its text encoder has CLIP ViT-L's width (768) over
  the byte tokenizer; text encoding is a rounding error of an edit's cost.
"""

from __future__ import annotations


import torch

from .shapes.tokenizer import build_tokenizer


def build_tiny_components(seed: int = 0) -> dict:
    """unet, vae, text_encoder, tokenizer, scheduler: SD1.5 layout, tiny widths, random weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                       vocab_size=514, max_position_embeddings=77, hidden_act="quick_gelu",
                       bos_token_id=512, eos_token_id=513, pad_token_id=513, projection_dim=32)
    )
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=32, attention_head_dim=(2, 2, 4, 4), norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 32, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=8, sample_size=128,
    )
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": build_tokenizer(),
            "scheduler": _scheduler()}


def build_sd15_shaped_components(seed: int = 0, device=None) -> dict:
    """unet, vae, text_encoder, tokenizer, scheduler: SD1.5's sizes, random weights (built on `device`)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    with torch.device(device or "cpu"):  # initialise where it will run: no 3.4 GB copy
        text_encoder = CLIPTextModel(
            CLIPTextConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                           vocab_size=514, max_position_embeddings=77, hidden_act="quick_gelu",
                           bos_token_id=512, eos_token_id=513, pad_token_id=513, projection_dim=768)
        )
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768, attention_head_dim=8,
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
            layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512,
        )
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": build_tokenizer(),
            "scheduler": _scheduler()}


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         num_train_timesteps=1000, steps_offset=1, set_alpha_to_one=False, clip_sample=False)


def build_tiny_pipeline(seed: int = 0, **kwargs):
    from .pipeline import DragonPipeline

    return DragonPipeline(**build_tiny_components(seed), **kwargs)
