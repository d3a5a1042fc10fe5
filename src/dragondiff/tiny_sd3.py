"""Random-weight components with the block layouts of SD3-Medium and SD3.5-Medium, built in code (no download).

For tests of the SD3 backbone (mechanics, shapes, dtypes, errors); not a model that makes pictures. What is kept of
the real models: an `SD3Transformer2DModel` with patch size 2 on a 16-channel latent, the last block
`context_pre_only` (diffusers makes it so), SD3.5's dual-attention blocks on the first layers with RMS q/k norms; a
16-channel `AutoencoderKL` with SD3's shift and scale and no quant convolutions, 4 levels (factor 8); two CLIP
text encoders with projections whose penultimate states concatenate to less than the joint width (SD3: 768 + 1280
padded to T5's 4096), their pooled outputs concatenated into the pooled projection; an optional T5 encoder whose
width is the joint width; `FlowMatchEulerDiscreteScheduler(shift=3.0)`. Widths and depths are tiny.
"""

from __future__ import annotations

import string

import torch

from .shapes.tokenizer import build_tokenizer

LAYOUTS = ("sd3", "sd3.5")

# SD3's VAE latent statistics (the real VAE's config.json): latent = (mean - shift) * scale.
SD3_SHIFT_FACTOR = 0.0609
SD3_SCALING_FACTOR = 1.5305
CLIP_WIDTHS = (32, 48)  # CLIP-L / CLIP-G stand-ins: the second is wider, as SD3's (768 vs 1280)
JOINT_WIDTH = 96  # T5's width and the transformer's joint_attention_dim; the CLIP states are padded up to it
T5_TOKENS = 256  # what StableDiffusion3Pipeline passes as max_sequence_length by default
NUM_LAYERS = 4  # SD3-Medium and SD3.5-Medium: 24
DUAL_LAYERS = (0, 1)  # SD3.5-Medium: blocks 0-12 of 24 have the image-only attn2


def build_tiny_sd3(seed: int = 0, layout: str = "sd3", with_t5: bool = True) -> dict:
    """transformer, vae, text_encoder(_2, _3), tokenizer(_2, _3), scheduler of `layout` ("sd3": joint attention
    only, as SD3-Medium; "sd3.5": dual attention on the first blocks and RMS q/k norms, as SD3.5-Medium), tiny
    widths, random weights. Without T5 (`with_t5=False`) text_encoder_3/tokenizer_3 are None, as diffusers allows."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {', '.join(LAYOUTS)}, got {layout!r}")
    if not isinstance(with_t5, bool):
        raise TypeError(f"with_t5: expected a bool, got {type(with_t5).__name__}")
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from .tiny import flow_scheduler

    torch.manual_seed(seed)
    text = dict(num_attention_heads=4, intermediate_size=37, vocab_size=514, max_position_embeddings=77,
                bos_token_id=512, eos_token_id=513, pad_token_id=513, hidden_act="gelu")
    # SD3 reads the penultimate hidden state of each: 3 layers so that it is not the first layer's output.
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=CLIP_WIDTHS[0], num_hidden_layers=3,
                                                              projection_dim=CLIP_WIDTHS[0], **text))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=CLIP_WIDTHS[1], num_hidden_layers=3,
                                                                projection_dim=CLIP_WIDTHS[1], **text))
    sd35 = layout == "sd3.5"
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=NUM_LAYERS,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=JOINT_WIDTH, caption_projection_dim=32,
        pooled_projection_dim=sum(CLIP_WIDTHS), pos_embed_max_size=32,
        dual_attention_layers=DUAL_LAYERS if sd35 else (), qk_norm="rms_norm" if sd35 else None,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 16, 32, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=8, sample_size=128, shift_factor=SD3_SHIFT_FACTOR, scaling_factor=SD3_SCALING_FACTOR,
        use_quant_conv=False, use_post_quant_conv=False,
    )
    parts = {"transformer": transformer, "vae": vae, "text_encoder": text_encoder, "tokenizer": build_tokenizer(),
             "text_encoder_2": text_encoder_2, "tokenizer_2": build_tokenizer(),
             "text_encoder_3": None, "tokenizer_3": None,
             "scheduler": flow_scheduler(num_train_timesteps=1000, shift=3.0)}
    if with_t5:
        parts["text_encoder_3"], parts["tokenizer_3"] = _tiny_t5(), build_t5_tokenizer()
    for part in parts.values():  # built modules start in training mode; loaded ones are in eval mode
        if isinstance(part, torch.nn.Module):
            part.eval()
    return parts


def _tiny_t5():
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=len(_t5_pieces()), d_model=JOINT_WIDTH, d_kv=16, d_ff=64, num_layers=2,
                      num_heads=2, relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
                      is_encoder_decoder=False, use_cache=False, dropout_rate=0.0, pad_token_id=0, eos_token_id=1)
    return T5EncoderModel(config)


def _t5_pieces() -> list[tuple[str, float]]:
    """A Unigram vocabulary in T5's order (pad, eos, unk, then pieces): every printable ASCII character, alone and
    after the word-start mark "▁". Captions need nothing more; a learned vocabulary buys nothing here."""
    chars = [c for c in string.printable if not c.isspace()]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + c, -3.0) for c in chars] + [(c, -4.0) for c in chars]
    return pieces


def build_t5_tokenizer(max_length: int = 512):
    """A T5 tokenizer (Unigram over single characters, `</s>` appended as T5's) built in code: no download. SD3's
    and FLUX's tiny models share it (`max_length`: the window, 512 as T5's)."""
    from transformers import T5Tokenizer

    return T5Tokenizer(vocab=_t5_pieces(), extra_ids=0, model_max_length=max_length)


def build_tiny_sd3_pipeline(seed: int = 0, layout: str = "sd3", with_t5: bool = True):
    """diffusers' own StableDiffusion3Pipeline over the tiny components (the reference the backbone is tested
    against, and what `save_tiny_sd3` writes)."""
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(**build_tiny_sd3(seed, layout, with_t5))


def save_tiny_sd3(folder, layout: str = "sd3", seed: int = 0, with_t5: bool = True):
    """Write a tiny SD3 model as a diffusers folder (model_index.json and one subfolder per component, safetensors),
    as diffusers writes a real one. Returns the folder."""
    from pathlib import Path

    build_tiny_sd3_pipeline(seed, layout, with_t5).save_pretrained(str(folder), safe_serialization=True)
    return Path(folder)


def build_sd35m_shaped(seed: int = 0, device=None, dtype=None) -> dict:
    """SD3.5-Medium at full size with random weights, built on `device` in `dtype` (default fp32), for the memory and
    speed benchmarks: the transformer (24 blocks, 24 heads x 64 = 1536 wide, dual attention in blocks 0-12, RMS q/k
    norms, patch 2, position embedding up to 384 patches), SD3's 16-channel VAE, CLIP-L (768 x 12) and CLIP-G
    (1280 x 32) with projections over the byte tokenizer, T5-XXL (4096 x 24) over the character tokenizer (256
    tokens read, the pipeline's default). Real vocabulary sizes, so the weights weigh what the real ones do."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from .tiny import CLIP_VOCAB, default_dtype, flow_scheduler, t5_xxl

    text = dict(vocab_size=CLIP_VOCAB, max_position_embeddings=77, bos_token_id=512, eos_token_id=513,
                pad_token_id=513)
    torch.manual_seed(seed)
    with default_dtype(dtype), torch.device(device or "cpu"):
        text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(
            hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
            hidden_act="quick_gelu", projection_dim=768, **text))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
            hidden_size=1280, num_hidden_layers=32, num_attention_heads=20, intermediate_size=5120,
            hidden_act="gelu", projection_dim=1280, **text))
        transformer = SD3Transformer2DModel(
            sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
            num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
            pooled_projection_dim=2048, pos_embed_max_size=384, dual_attention_layers=tuple(range(13)),
            qk_norm="rms_norm")
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
            layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            sample_size=1024, shift_factor=SD3_SHIFT_FACTOR, scaling_factor=SD3_SCALING_FACTOR, use_quant_conv=False,
            use_post_quant_conv=False)
        text_encoder_3 = t5_xxl()
    return {"transformer": transformer, "vae": vae, "text_encoder": text_encoder, "tokenizer": build_tokenizer(),
            "text_encoder_2": text_encoder_2, "tokenizer_2": build_tokenizer(), "text_encoder_3": text_encoder_3,
            "tokenizer_3": build_t5_tokenizer(),
            "scheduler": flow_scheduler(num_train_timesteps=1000, shift=3.0)}
