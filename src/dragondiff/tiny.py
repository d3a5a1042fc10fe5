"""Tiny random-weight components with SD1.5's exact block layout, built in about a second.

For tests (mechanics, shapes, dtypes, errors) and the smoke demo. Not a model that makes pictures: its outputs are
deterministic noise-like colour fields.
"""

from __future__ import annotations


import torch

from .shapes.tokenizer import build_tokenizer


def build_tiny_components(seed: int = 0) -> dict:
    """unet, vae, text_encoder, tokenizer, scheduler: SD1.5 layout, tiny widths, random weights."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
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
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, steps_offset=1, set_alpha_to_one=False, clip_sample=False)
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": build_tokenizer(),
            "scheduler": scheduler}


def build_tiny_pipeline(seed: int = 0, **kwargs):
    from .pipeline import DragonPipeline

    return DragonPipeline(**build_tiny_components(seed), **kwargs)
