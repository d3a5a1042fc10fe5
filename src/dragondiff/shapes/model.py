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


# ------------------------------------------------------------------------------------- the flow model (v4)
# An SD3-style transformer on the same VAE, tokenizer and scenes: `dragondiff:shapes-flow` (docs/shapes-model.md).

FLOW_WEIGHTS = Path(__file__).parent / "weights-flow"
FLOW_LAYERS, FLOW_HEADS, FLOW_HEAD_DIM = 8, 4, 32


def build_flow_transformer():
    """SD3Transformer2DModel on the 16x16 latents with patch size 1: a 16x16 token grid, so the guidance features
    keep the UNet model's finest feature resolution (patch 2 would leave 8x8 tokens, 2-3 per object). 8 joint
    blocks of width 128 (4.65 M parameters): the bank owns blocks 4-7, features come after blocks 3 and 5."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=16, patch_size=1, in_channels=4, out_channels=4, num_layers=FLOW_LAYERS,
        attention_head_dim=FLOW_HEAD_DIM, num_attention_heads=FLOW_HEADS, joint_attention_dim=64,
        caption_projection_dim=FLOW_HEADS * FLOW_HEAD_DIM, pooled_projection_dim=64, pos_embed_max_size=16,
    )


def build_flow_text_encoder(text_encoder=None):
    """The shapes CLIP with a projection (SD3 reads a pooled projection): the UNet model's trained encoder when
    given (its weights copied; the projection starts random), else a fresh one."""
    from transformers import CLIPTextModelWithProjection

    config = (text_encoder or build_text_encoder()).config
    model = CLIPTextModelWithProjection(config).float()  # a loaded encoder's config may say fp16
    if text_encoder is not None:
        model.text_model.load_state_dict(text_encoder.float().state_dict())  # same modules, under text_model
    return model


def build_flow_scheduler():
    """SD3's flow-matching Euler scheduler, shift 1: at 256 tokens there is no resolution to shift for (SD3's 3.0
    is for 4096)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


def flow_is_available() -> bool:
    return any((FLOW_WEIGHTS / "transformer").glob("diffusion_pytorch_model*.safetensors"))
