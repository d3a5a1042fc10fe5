"""Random-weight components with FLUX.1-dev's layout, tiny widths, built in code in about a second (no download).

What is FLUX.1-dev's and what is shrunk:
- transformer: FluxTransformer2DModel with double-stream blocks, then single-stream blocks (19 + 38 in the dev
  model, 2 + 2 here), the guidance embedding of the guidance-distilled dev model, patch_size 1 and in_channels =
  4 x the VAE's latent channels (the pipeline packs 2x2 latent cells into one token), RoPE over 3 axes whose widths
  sum to the head width (16 + 56 + 56 = 128 there, 4 + 6 + 6 = 16 here).
- vae: AutoencoderKL with 16 latent channels, FLUX's shift_factor 0.1159 and scaling_factor 0.3611, no quant convs,
  4 levels (factor 8), narrow.
- text_encoder + tokenizer: CLIP (the pipeline reads its pooled output only), the byte tokenizer of
  `shapes.tokenizer`; text_encoder_2 + tokenizer_2: a T5 encoder (gated-gelu, as T5 v1.1) and a Unigram T5 tokenizer
  over single characters built with the `tokenizers` library (FLUX reads T5's token states).
- scheduler: FlowMatchEulerDiscreteScheduler as FLUX.1-dev's (shift 3.0, dynamic shifting between 256 and 4096
  image tokens, base/max shift 0.5/1.15).
Not a model that makes pictures: for tests of mechanics, shapes and the contract.
"""

from __future__ import annotations

import torch

from .shapes.tokenizer import build_tokenizer

T5_MAX_TOKENS = 64  # the tiny T5 tokenizer's window (FLUX.1-dev's is 512): short sequences keep tests fast
FLUX_T5_TOKENS = 512  # FLUX.1-dev's T5 window (the full-size model's)


def build_t5_tokenizer(max_length: int = T5_MAX_TOKENS):
    """The tiny models' T5 tokenizer (`tiny_sd3.build_t5_tokenizer`) with FLUX's tiny window."""
    from .tiny_sd3 import build_t5_tokenizer as t5_tokenizer

    return t5_tokenizer(max_length)


def flux_scheduler():
    """FLUX.1-dev's scheduler configuration."""
    from .tiny import flow_scheduler

    return flow_scheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                           base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                           max_image_seq_len=4096)


def build_tiny_flux(seed: int = 0, guidance_embeds: bool = True) -> dict:
    """transformer, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, scheduler: FLUX.1-dev's layout
    (`guidance_embeds=False`: a timestep-distilled, FLUX.1-schnell-type transformer), tiny widths, random weights."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    width = 32
    text_encoder = CLIPTextModel(
        CLIPTextConfig(hidden_size=width, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                       vocab_size=514, max_position_embeddings=77, hidden_act="quick_gelu",
                       bos_token_id=512, eos_token_id=513, pad_token_id=513, projection_dim=width))
    tokenizer_2 = build_t5_tokenizer()
    text_encoder_2 = T5EncoderModel(
        T5Config(vocab_size=len(tokenizer_2), d_model=width, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                 relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                 pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, is_encoder_decoder=False))
    latent_channels = 16
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(8, 16, 32, 32),
        layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=8, sample_size=128, shift_factor=0.1159, scaling_factor=0.3611,
        use_quant_conv=False, use_post_quant_conv=False)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * latent_channels, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=width, pooled_projection_dim=width,
        guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6))
    return {"transformer": transformer, "vae": vae, "text_encoder": text_encoder, "tokenizer": build_tokenizer(),
            "text_encoder_2": text_encoder_2, "tokenizer_2": tokenizer_2, "scheduler": flux_scheduler()}


def save_tiny_flux(folder, seed: int = 0, guidance_embeds: bool = True):
    """Write a tiny FLUX model as a diffusers folder (model_index.json, one subfolder per component, safetensors),
    as FluxPipeline.from_pretrained and `FluxBackbone.from_pretrained` read a real one. Returns the folder."""
    from pathlib import Path

    from diffusers import FluxPipeline

    FluxPipeline(**build_tiny_flux(seed, guidance_embeds)).save_pretrained(str(folder), safe_serialization=True)
    return Path(folder)


def build_flux_shaped(seed: int = 0, device=None, dtype=None) -> dict:
    """FLUX.1-dev at full size with random weights, built on `device` in `dtype` (default fp32), for the memory and
    speed benchmarks: the transformer (19 double-stream + 38 single-stream blocks, 24 heads x 128 = 3072 wide, RoPE
    axes (16, 56, 56), guidance embedding, 64 input channels = 16 latent channels packed 2x2), FLUX's 16-channel
    VAE, CLIP-L (768 x 12, pooled) over the byte tokenizer, T5-XXL (4096 x 24) over the character tokenizer with
    FLUX.1-dev's 512-token window. Real vocabulary sizes, so the weights weigh what the real ones do."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .tiny import CLIP_VOCAB, default_dtype, t5_xxl

    torch.manual_seed(seed)
    with default_dtype(dtype), torch.device(device or "cpu"):
        text_encoder = CLIPTextModel(CLIPTextConfig(
            hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
            hidden_act="quick_gelu", projection_dim=768, vocab_size=CLIP_VOCAB, max_position_embeddings=77,
            bos_token_id=512, eos_token_id=513, pad_token_id=513))
        text_encoder_2 = t5_xxl()
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
            axes_dims_rope=(16, 56, 56))
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
            layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            sample_size=1024, shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False,
            use_post_quant_conv=False)
    return {"transformer": transformer, "vae": vae, "text_encoder": text_encoder, "tokenizer": build_tokenizer(),
            "text_encoder_2": text_encoder_2, "tokenizer_2": build_t5_tokenizer(FLUX_T5_TOKENS),
            "scheduler": flux_scheduler()}
