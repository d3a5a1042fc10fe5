"""Random-weight components with the exact block layouts of SD1.5, SD2.x and SDXL, built in code (no download).

- tiny: built in about a second; for tests (mechanics, shapes, dtypes, errors) and the smoke demo. Not a model
  that makes pictures: its outputs are deterministic noise-like colour fields. `layout` picks the family:
  "sd1" (SD1.5), "sd2" (SD2.1-base: linear projections, gelu text encoder, ε), "sd2-v" (the same predicting v, as
  SD2.1 at 768 px), "sdxl" (SDXL base: 3 levels, 2 text encoders, pooled text and time ids, 10-layer-deep blocks
  cut to 2).
- sd15-shaped: SD1.5's UNet and VAE at full size (860 M + 84 M parameters) with random weights, for the speed and
  memory benchmarks (compute does not depend on weight values). Its text encoder has CLIP ViT-L's width (768) over
  the byte tokenizer; text encoding is a rounding error of an edit's cost.
- sd21-shaped, sdxl-shaped, sd35m-shaped (SD3.5-Medium), flux-shaped (FLUX.1-dev): the same for the other families
  (`SHAPED`, `build_shaped_components`); the flow transformers' builders are in tiny_sd3.py and tiny_flux.py.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from .shapes.tokenizer import build_tokenizer


UNET_LAYOUTS = ("sd1", "sd2", "sd2-v", "sdxl")
# Flow-matching transformers (tiny_sd3.py, tiny_flux.py): SD3-Medium, SD3.5-Medium (dual attention), FLUX.1-dev.
FLOW_LAYOUTS = ("sd3", "sd3.5", "flux")
LAYOUTS = UNET_LAYOUTS + FLOW_LAYOUTS


def build_tiny_components(seed: int = 0, layout: str = "sd1") -> dict:
    """unet (or transformer), vae, text_encoder, tokenizer, scheduler (and the second and third text encoders and
    tokenizers of SDXL, SD3 and FLUX): the block layout of `layout` (one of LAYOUTS), tiny widths, random weights."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {', '.join(LAYOUTS)}, got {layout!r}")
    if layout == "sdxl":
        return _tiny_sdxl(seed)
    if layout == "flux":
        from .tiny_flux import build_tiny_flux

        return build_tiny_flux(seed)
    if layout in FLOW_LAYOUTS:
        from .tiny_sd3 import build_tiny_sd3

        return build_tiny_sd3(seed, layout)
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    sd2 = layout != "sd1"
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                       vocab_size=514, max_position_embeddings=77, hidden_act="gelu" if sd2 else "quick_gelu",
                       bos_token_id=512, eos_token_id=513, pad_token_id=513, projection_dim=32)
    )
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=32, attention_head_dim=(2, 2, 4, 4), norm_num_groups=8,
        **({"use_linear_projection": True} if sd2 else {}),
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 32, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=8, sample_size=128,
    )
    scheduler = _scheduler(**({"prediction_type": "v_prediction"} if layout == "sd2-v" else {}))
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": build_tokenizer(),
            "scheduler": scheduler}


def _tiny_sdxl(seed: int) -> dict:
    """SDXL base's layout: DownBlock2D + 2 CrossAttnDownBlock2D (2 transformer layers in the last two, SDXL's 2 and
    10), two text encoders whose penultimate states concatenate to the cross-attention width, a pooled projection,
    6 time ids; SDXL's VAE settings (scaling factor 0.13025, force_upcast)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    text = dict(num_attention_heads=4, intermediate_size=37, vocab_size=514, max_position_embeddings=77,
                bos_token_id=512, eos_token_id=513, pad_token_id=513)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=32, num_hidden_layers=2, hidden_act="quick_gelu",
                                                projection_dim=32, **text))
    # The second encoder is wider than the first, as SDXL's (1280 vs 768): single-file loading tells them apart so.
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=48, num_hidden_layers=3,
                                                                hidden_act="gelu", projection_dim=32, **text))
    time_dim = 8
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 2), attention_head_dim=(2, 4, 4), use_linear_projection=True,
        cross_attention_dim=32 + 48, addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + 32, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 32, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=8, sample_size=128, scaling_factor=0.13025, force_upcast=True,
    )
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": build_tokenizer(),
            "text_encoder_2": text_encoder_2, "tokenizer_2": build_tokenizer(),
            "scheduler": _scheduler(timestep_spacing="leading")}


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


# Full-size random models: default px. The flow transformers' builders live beside their tiny ones (tiny_sd3.py,
# tiny_flux.py): "sd35m-shaped" is SD3.5-Medium, "flux-shaped" FLUX.1-dev.
SHAPED = {"sd15-shaped": 512, "sd21-shaped": 768, "sdxl-shaped": 1024, "sd35m-shaped": 1024, "flux-shaped": 1024}
# Vocabulary sizes of the real text encoders: their embedding tables are part of the weights (T5-XXL's is 263 MB
# in 16-bit); the byte and character tokenizers used with them give ids far below these.
CLIP_VOCAB, T5_VOCAB = 49408, 32128


@contextmanager
def default_dtype(dtype):
    """Parameters made inside are made in `dtype` (default fp32): a full-size model built without an fp32 copy first,
    and fake parameters (which cannot be cast after they are made) in the dtype measured."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype or torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def flow_scheduler(**config):
    """A FlowMatchEulerDiscreteScheduler with real σ tables even inside a FakeTensorMode (`bench memory` builds the
    models on fake tensors; the scheduler reads its own tables back with .item())."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        return FlowMatchEulerDiscreteScheduler(**config)


def t5_xxl(vocab_size: int = T5_VOCAB):
    """A random T5 v1.1 XXL encoder (4096 wide, 24 layers, 64 heads, gated-GELU 10240): SD3's and FLUX's T5."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                   num_heads=64, relative_attention_num_buckets=32, feed_forward_proj="gated-gelu",
                                   is_encoder_decoder=False, use_cache=False, dropout_rate=0.0, pad_token_id=0,
                                   eos_token_id=1, tie_word_embeddings=False))


def build_shaped_components(name: str, seed: int = 0, device=None, dtype=None) -> dict:
    """Full-size random components of SHAPED[name]'s family, built on `device` in `dtype` (default fp32; SDXL's VAE
    stays fp32 under fp16, as the backbone runs it): for the speed and memory benchmarks ("sd35m-shaped":
    tiny_sd3.build_sd35m_shaped, "flux-shaped": tiny_flux.build_flux_shaped). "sd21-shaped" is
    SD2.1 (768 px, v-prediction, OpenCLIP ViT-H text: 1024 wide, 23 layers); "sdxl-shaped" SDXL base (2.6 B UNet;
    CLIP ViT-L 768 x 12 and OpenCLIP bigG 1280 x 32 text encoders over the byte tokenizer)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if name not in SHAPED:
        raise ValueError(f"name: expected one of {', '.join(SHAPED)}, got {name!r}")
    if name == "sd35m-shaped":
        from .tiny_sd3 import build_sd35m_shaped

        return build_sd35m_shaped(seed, device, dtype)
    if name == "flux-shaped":
        from .tiny_flux import build_flux_shaped

        return build_flux_shaped(seed, device, dtype)
    dtype = dtype or torch.float32
    if name == "sd15-shaped":
        parts = build_sd15_shaped_components(seed, device) if dtype == torch.float32 else None
        if parts is not None:
            return parts
    text = dict(vocab_size=514, max_position_embeddings=77, bos_token_id=512, eos_token_id=513, pad_token_id=513)
    vae_args = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                    layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                    up_block_types=("UpDecoderBlock2D",) * 4, sample_size=SHAPED[name])
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype: no full-size fp32 copy first
    try:
        with torch.device(device or "cpu"):
            if name == "sdxl-shaped":
                text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=768, num_hidden_layers=12,
                                                            num_attention_heads=12, intermediate_size=3072,
                                                            hidden_act="quick_gelu", projection_dim=768, **text))
                text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
                    hidden_size=1280, num_hidden_layers=32, num_attention_heads=20, intermediate_size=5120,
                    hidden_act="gelu", projection_dim=1280, **text))
                unet = UNet2DConditionModel(
                    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                    block_out_channels=(320, 640, 1280),
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                    use_linear_projection=True, cross_attention_dim=2048, addition_embed_type="text_time",
                    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
                )
                torch.set_default_dtype(torch.float32 if dtype == torch.float16 else dtype)
                vae = AutoencoderKL(**vae_args, scaling_factor=0.13025, force_upcast=True)
                return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": build_tokenizer(),
                        "text_encoder_2": text_encoder_2, "tokenizer_2": build_tokenizer(),
                        "scheduler": _scheduler(timestep_spacing="leading")}
            sd21 = name == "sd21-shaped"
            text_encoder = CLIPTextModel(CLIPTextConfig(
                hidden_size=1024 if sd21 else 768, num_hidden_layers=23 if sd21 else 12,
                num_attention_heads=16 if sd21 else 12, intermediate_size=4096 if sd21 else 3072,
                hidden_act="gelu" if sd21 else "quick_gelu", projection_dim=1024 if sd21 else 768, **text))
            unet = UNet2DConditionModel(
                sample_size=SHAPED[name] // 8, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=(320, 640, 1280, 1280),
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                cross_attention_dim=1024 if sd21 else 768, attention_head_dim=(5, 10, 20, 20) if sd21 else 8,
                use_linear_projection=sd21,
            )
            vae = AutoencoderKL(**vae_args)
    finally:
        torch.set_default_dtype(previous)
    scheduler = _scheduler(**({"prediction_type": "v_prediction"} if name == "sd21-shaped" else {}))
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": build_tokenizer(),
            "scheduler": scheduler}


def _scheduler(**kwargs):
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         num_train_timesteps=1000, steps_offset=1, set_alpha_to_one=False, clip_sample=False,
                         **kwargs)


def build_tiny_pipeline(seed: int = 0, layout: str = "sd1", **kwargs):
    from .pipeline import DragonPipeline

    return DragonPipeline(**build_tiny_components(seed, layout), **kwargs)


def save_tiny_model(folder, layout: str = "sd1", seed: int = 0):
    """Write a tiny random model of `layout` as a diffusers folder (model_index.json and one subfolder per
    component, safetensors), as `from_pretrained` and the CLI's --model read a real one. Returns the folder."""
    from pathlib import Path

    from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    parts = build_tiny_components(seed, layout)
    if layout == "flux":
        pipe = FluxPipeline(**parts)
    elif layout in FLOW_LAYOUTS:
        pipe = StableDiffusion3Pipeline(**parts)
    elif layout == "sdxl":
        pipe = StableDiffusionXLPipeline(**parts)
    else:
        pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return Path(folder)
