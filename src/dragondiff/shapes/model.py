"""Architecture of the bundled shapes model: SD1.5's component layout at a size that trains on 2 CPU cores.

- AutoencoderKL, 4 blocks (scale factor 8), 4 latent channels: 128 px images <-> 16x16 latents.
- UNet2DConditionModel with SD1.5's block types (3 CrossAttnDown + Down / Up + 3 CrossAttnUp, transformer
  self+cross attention in every attention block, cross-attention mid block), widths (64, 64, 128, 128) and one
  layer per block (6 decoder self-attention layers instead of SD1.5's 9: about 4x cheaper to train).
- CLIPTextModel (transformers) trained from scratch with the model, over the byte-level CLIP tokenizer of
  `dragondiff.tiny` (no merges): captions use a handful of words, so a learned vocabulary buys nothing.
- DDIM scheduler with SD1.5's configuration.
"""

from __future__ import annotations

from pathlib import Path

WEIGHTS = Path(__file__).parent / "weights"


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64, 64, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=16, sample_size=128,
    )


def build_unet(layers_per_block: int = 1):
    """layers_per_block=2 is SD1.5's depth (9 decoder self-attention layers instead of 6)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=layers_per_block,
        block_out_channels=(64, 64, 128, 128),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=64, attention_head_dim=4, norm_num_groups=16,
    )


def build_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=256,
                       vocab_size=514, max_position_embeddings=77, hidden_act="quick_gelu",
                       bos_token_id=512, eos_token_id=513, pad_token_id=513, projection_dim=64)
    )


def build_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                         steps_offset=1, set_alpha_to_one=False, clip_sample=False)


def is_available() -> bool:
    # one file, or shards beside an index when the UNet outgrows the 16 MiB per-file limit
    return any((WEIGHTS / "unet").glob("diffusion_pytorch_model*.safetensors"))
