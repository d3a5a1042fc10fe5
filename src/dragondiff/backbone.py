"""The model behind the sampler: every model call the inversion, the guided sampler and the feature passes make.

The sampler never touches a UNet directly; it asks a backbone for ε, for guidance features, for conditioning and
for encoding and decoding, in the spirit of k-diffusion's `model(x, sigma, **extra_args)`. Conditioning is a
`Conditioning` value built by `backbone.condition(...)`: the sampler batches and slices it without knowing its
fields, so image-prompt tokens or SDXL's pooled text and size ids travel in it without touching the sampler.

`SD1Backbone` is the first implementation: a stock diffusers `UNet2DConditionModel`, `AutoencoderKL` and CLIP text
encoder, changed only through attention processors (the memory bank). One explicit forward serves both the ε
prediction and the feature pass, which stops after the last feature block instead of running the whole UNet.
Whatever the UNet predicts (ε or v), `predict` returns ε (the DDIM rule's space). `SD2Backbone` (here) and
`SDXLBackbone` (backbone_sdxl.py) are the same class with another layout, listed in `loading.BACKBONES`. The
flow-matching transformers (backbone_sd3.py, backbone_flux.py) share `Backbone` and `TransformerBackbone` below.
"""

from __future__ import annotations

import math
import threading
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np
import torch

from .attention import BankAttnProcessor, BankSlot, install_bank_processors
from .errors import NonFiniteError
from .limits import check_prompt


@dataclass(frozen=True)
class Conditioning:
    """What the model is conditioned on, batch first: text token embeddings, optional image-prompt tokens, and
    added conditions keyed by name (e.g. SDXL's pooled text and size ids). Built only by `backbone.condition`."""

    text: torch.Tensor  # (B, L, C)
    image_tokens: torch.Tensor | None = None  # (B, N, C) image-prompt tokens, for a backbone that reads them
    added: dict[str, torch.Tensor] = field(default_factory=dict)  # (B, ...) each
    # How the image tokens are read: the weight of the image-prompt term (0: not at all, as outside the official
    # step window), and how many of the leading image tokens go through the text K/V instead (the official
    # two-image quirk: the base image's 64 tokens are read as words).
    image_scale: float = 0.0
    image_text_tokens: int = 0

    @property
    def batch(self) -> int:
        return self.text.shape[0]

    def _map(self, fn) -> "Conditioning":
        return replace(self, text=fn(self.text),
                       image_tokens=None if self.image_tokens is None else fn(self.image_tokens),
                       added={k: fn(v) for k, v in self.added.items()})

    def __getitem__(self, index) -> "Conditioning":
        """Batch elements `index` (an int keeps the batch dimension)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return self._map(lambda t: t[index])

    def with_image_scale(self, scale: float) -> "Conditioning":
        """The same conditioning with the image-prompt term weighted by `scale` (no-op without image tokens)."""
        return self if self.image_tokens is None or self.image_scale == scale else replace(self, image_scale=scale)

    def text_only(self) -> "Conditioning":
        """Without image tokens (what inversion and the feature passes see)."""
        return self if self.image_tokens is None else replace(self, image_tokens=None, image_scale=0.0,
                                                              image_text_tokens=0)

    def repeat(self, n: int) -> "Conditioning":
        return self._map(lambda t: t.repeat(n, *([1] * (t.dim() - 1))))

    @staticmethod
    def cat(conds: Sequence["Conditioning"]) -> "Conditioning":
        """One conditioning whose batch holds the given ones in order (e.g. [uncond, cond] for CFG)."""
        first = conds[0]
        if any((c.image_tokens is None) != (first.image_tokens is None) or set(c.added) != set(first.added)
               or (c.image_scale, c.image_text_tokens) != (first.image_scale, first.image_text_tokens)
               for c in conds):
            raise ValueError("conditionings to batch must carry the same kinds of conditions")
        return Conditioning(
            text=torch.cat([c.text for c in conds]),
            image_tokens=None if first.image_tokens is None else torch.cat([c.image_tokens for c in conds]),
            added={k: torch.cat([c.added[k] for c in conds]) for k in first.added},
            image_scale=first.image_scale, image_text_tokens=first.image_text_tokens,
        )


def decoder_self_attention_names(unet, blocks: tuple[int, ...] | None = None) -> list[str]:
    """Processor names of the decoder self-attention layers (of up blocks `blocks`; None: all), in UNet order."""
    names = [n for n in unet.attn_processors if n.startswith("up_blocks.") and ".attn1." in n
             and (blocks is None or int(n.split(".")[1]) in blocks)]
    if not names:
        where = "up_blocks.*" if blocks is None else f"up_blocks {list(blocks)}"
        raise ValueError(f"unet: no decoder self-attention layers ({where}.attn1) found; is this a Stable "
                         "Diffusion UNet?")
    return names


def estimate_bank_bytes(unet, latent_hw: tuple[int, int], steps: int, images: int = 1, dtype=None,
                        blocks: tuple[int, ...] | None = None) -> int:
    """Bytes of a memory bank before it is captured: K and V of every decoder self-attention layer at every step.

    up_blocks[k] of an n-block decoder works at latent / 2**(n-1-k); its attn1 keys have `to_k.out_features`
    channels per token.
    """
    n_up = len(unet.up_blocks)
    size = torch.finfo(dtype or unet.dtype).bits // 8
    total = 0
    for name in decoder_self_attention_names(unet, blocks):
        block = int(name.split(".")[1])
        module = unet.get_submodule(name.removesuffix(".processor"))
        tokens = math.ceil(latent_hw[0] / 2 ** (n_up - 1 - block)) * math.ceil(latent_hw[1] / 2 ** (n_up - 1 - block))
        total += 2 * tokens * module.to_k.out_features * size
    return total * steps * images


def is_cross_attention(processor_name: str) -> bool:
    """Whether a UNet attention processor is a cross-attention layer's (where an image prompt's K/V go)."""
    return ".attn2." in processor_name


_LOCKS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(module: torch.nn.Module) -> threading.RLock:
    """One re-entrant lock per model object: edits change what its attention layers read, so edits on one UNet
    are serialised even when several backbones (or pipelines) wrap it."""
    with _LOCKS_GUARD:
        if module not in _LOCKS:
            _LOCKS[module] = threading.RLock()
        return _LOCKS[module]


# What a UNet may predict: ε, or v = √ᾱ·ε − √(1−ᾱ)·x0 (SD2.x at 768 px). `eps()` always returns ε.
PREDICTION_TYPES = ("epsilon", "v_prediction")


class Backbone:
    """What every backbone family shares: the plumbing around its network (`denoiser`), VAE and text encoders.

    A family (SD1Backbone here, SD3Backbone, FluxBackbone, ...) adds its layout: `predict` (the prediction its step
    rule `RULE` reads), `features`, `condition`, `encode_image` / `decode`, `bank_layer_names` and the attention
    processor that runs the bank on them (`BANK_PROCESSOR`), `describe`, `from_components` / `from_pretrained`."""

    NAME = "?"
    RULE = "ddim"  # the step rule (steps.RULES) its scheduler's configuration is read with
    BANK_PROCESSOR = BankAttnProcessor  # built as BANK_PROCESSOR(slot, layer) on each bank layer
    REPEATED_BLOCKS: tuple[str, ...] | None = None  # what `enable_compile` compiles (None: diffusers' own list)
    ACTIVATION_BYTES_PER_CELL = 0.0
    CHECKPOINTED_BYTES_PER_CELL: float | None = None  # the same with gradient checkpointing (None: not measured)
    # What the family takes besides its own weights (the UNet families: IP-Adapters and LoRAs in diffusers' layouts).
    IMAGE_PROMPT = False
    LORA = False
    image_prompt = None  # an image_prompt.ImagePrompt once loaded (UNet families)
    _bank: BankSlot

    @property
    def denoiser(self) -> torch.nn.Module:
        """The network that predicts noise or velocity (what locks, compilation and LoRAs act on)."""
        raise NotImplementedError

    @classmethod
    def check_config(cls, config) -> None:
        """Refuse, by name, a variant of the family's layout it does not run (before any weight is read)."""

    @classmethod
    def grid_factor(cls, config):
        """Feature-grid cells per latent cell of a model with this denoiser configuration (`feature_factor`)."""
        return cls.FEATURE_FACTOR

    def set_rule(self, rule) -> None:
        """The pipeline's step rule over the scheduler's configuration: it must be the family's."""
        if rule.NAME != self.RULE:
            raise ValueError(f"scheduler: a {self.NAME} model is sampled with the {self.RULE} rule, got a "
                             f"{rule.NAME} scheduler configuration")

    @property
    def key(self) -> int:
        """Identifies the weights an Inversion was made with (an inversion is only valid for them)."""
        return id(self.denoiser)

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    def module_dtype(self, module: torch.nn.Module, dtype: torch.dtype) -> torch.dtype:
        """The dtype `module` runs in when the model runs in `dtype` (all the same unless a family says otherwise:
        SDXL's VAE)."""
        return dtype

    def to(self, device: torch.device, dtype: torch.dtype) -> None:
        """Move / cast every module; a failed move (e.g. out of memory) puts them back and re-raises."""
        before = [(next(m.parameters()).device, next(m.parameters()).dtype) for m in self.modules]
        try:
            for module in self.modules:
                param = next(module.parameters())
                want = self.module_dtype(module, dtype)
                if param.device != device or param.dtype != want:  # diffusers warns on no-op casts
                    module.to(device=device, dtype=want)
        except (RuntimeError, AssertionError):
            for module, (dev, dt) in zip(self.modules, before):
                module.to(device=dev, dtype=dt)
            raise

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def vae_factor(self) -> int:
        """Pixels per latent cell, from the VAE's configuration (as diffusers' `vae_scale_factor`)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def vae_tiling(self) -> bool:
        return bool(getattr(self.vae, "use_tiling", False))

    def set_vae_tiling(self, enabled: bool, tile_px: int | None = None) -> None:
        """Encode and decode in overlapping tiles of tile_px pixels (the VAE's own default when None)."""
        if tile_px is not None:
            self.vae.tile_sample_min_size = tile_px
            self.vae.tile_latent_min_size = tile_px // self.vae_factor
        if enabled:
            self.vae.enable_tiling()
        else:
            self.vae.disable_tiling()

    # -------------------------------------------------------------------------------------- image prompt

    def load_image_prompt(self, prompt) -> None:
        raise ValueError(f"image_prompt: no IP-Adapter support on {self.NAME} yet; supported: SD1.x/SD2.x/SDXL")

    def unload_image_prompt(self) -> None:
        """Nothing to unload where no image prompt can be loaded."""

    def add_image_prompt(self, cond, uncond, images, *, base_as_text: bool):
        self.load_image_prompt(None)

    # ------------------------------------------------------------------------------------ the memory bank

    @property
    def bank_layers(self) -> list[str]:
        """Processor names of the layers the memory bank owns."""
        return [n if n.endswith(".processor") else n + ".processor" for n in self.bank_layer_names()]

    @contextmanager
    def memory_bank(self, controller):
        """Route the bank layers' image-token K/V through a bank controller for the duration of the block.

        The bank processors read their controller from a slot owned by this backbone: installing them is
        idempotent, and what they do is data (the controller's mode and step), so a compiled or graph-captured
        network would not need rebuilding per edit. The original processors come back after the block.
        """
        with self.lock:
            originals = install_bank_processors(self.denoiser, self._bank, self.bank_layers, self.BANK_PROCESSOR)
            previous, self._bank.controller = self._bank.controller, controller
            try:
                yield
            finally:
                self._bank.controller = previous
                if originals is not None:
                    self.denoiser.set_attn_processor(originals)

    def activation_bytes(self, latent_hw: tuple[int, int]) -> int:
        """GPU bytes the largest pass of an edit needs at this latent size (an estimate for full-size weights;
        scaled by the model dtype's width)."""
        width = torch.finfo(self.dtype).bits / 16
        per_cell = self.ACTIVATION_BYTES_PER_CELL
        if getattr(self.denoiser, "gradient_checkpointing", False) and self.CHECKPOINTED_BYTES_PER_CELL is not None:
            per_cell = self.CHECKPOINTED_BYTES_PER_CELL
        return int(per_cell * latent_hw[0] * latent_hw[1] * width)

    # ------------------------------------------------------------------------------------------- encoders

    def _check_prompts(self, prompts: Sequence[str]) -> list[str]:
        for k, p in enumerate(prompts):
            if not isinstance(p, str):
                raise TypeError(f"prompt: expected a string, got {type(p).__name__} (prompt #{k})")
            check_prompt(p, f"prompt #{k}")
        return list(prompts)


# Guidance features of a transformer: "dit" (DiTF-style: normalised as the next layer reads them, massive-activation
# channels dropped) or "raw" (the hidden states).
FEATURE_NORMS = ("raw", "dit")
# A channel is "massive" when its mean |activation| over the tokens is above this many times the median channel's.
# Massive activations are reported orders of magnitude (100-1000x) above ordinary channels, while ordinary channels
# of a layer-normed residual stream rarely spread past 3-4x the median: 10x separates the two with room on both
# sides. Unverified on real SD3 / FLUX weights.
MASSIVE_RATIO = 10.0


def drop_massive_channels(features: torch.Tensor, raw: torch.Tensor, ratio: float = MASSIVE_RATIO) -> torch.Tensor:
    """`features` (B, N, C) with the channels zeroed whose mean |raw| (the hidden states before normalisation, where
    massive activations are defined) over the batch's tokens is above `ratio` times the median channel's. One
    channel set for the whole batch; the selection is a mask (not differentiated), the kept channels are."""
    with torch.no_grad():
        level = raw.detach().abs().float().mean(dim=(0, 1))
        massive = level > ratio * level.median()
    return features * (~massive).to(features.dtype)


class TransformerBackbone(Backbone):
    """What the flow-matching transformer families (SD3, FLUX) share besides `Backbone`: the flow-euler step rule,
    the guidance features' normalisation switch, and channels-last for the VAE (the transformer has no
    convolutions to speak of)."""

    RULE = "flow-euler"
    prediction_type = "flow"
    _feature_norm = "dit"

    @property
    def feature_norm(self) -> str:
        """How guidance features are normalised: one of FEATURE_NORMS ("dit" by default)."""
        return self._feature_norm

    @feature_norm.setter
    def feature_norm(self, value: str) -> None:
        if value not in FEATURE_NORMS:
            raise ValueError(f"feature_norm: expected one of {', '.join(FEATURE_NORMS)}, got {value!r}")
        self._feature_norm = value

    @property
    def channels_last(self) -> bool:
        weight = self.vae.encoder.conv_in.weight
        return weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()

    def set_channels_last(self, enabled: bool) -> None:
        """Channels-last weights for the VAE's convolutions."""
        self.vae.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)


class SD1Backbone(Backbone):
    """Stable Diffusion 1.x: UNet2DConditionModel, AutoencoderKL with scale factor 8, CLIP text."""


    NAME = "SD1.x"
    IMAGE_PROMPT = LORA = True
    SUPPORTS = ("SD1.x: a UNet2DConditionModel without added conditions or linear projections, one CLIP text "
                "encoder")
    # Guidance features: outputs of these up blocks (the official up_ft_index: the decoder outputs at 1/2 and 1/1 of
    # the latent resolution), compared on a grid FEATURE_FACTOR times the latent resolution (the official code
    # resizes both maps to 2x the latent, i.e. H/4).
    FEATURE_BLOCKS = (1, 2)
    FEATURE_FACTOR = 2
    # The up blocks whose self-attention the memory bank covers (None: every decoder self-attention layer).
    BANK_BLOCKS: tuple[int, ...] | None = None
    # GPU bytes per latent cell of the largest pass of an edit (the guidance evaluation: feature pass with gradient
    # and its backward) in 16-bit, at full size: `dragondiff bench memory` (3.52 GiB at 768 px for SD1.5; 3.45 for
    # SD2.1: docs/results/memory-unet.json).
    ACTIVATION_BYTES_PER_CELL = 3.52 * 2**30 / 96**2

    def __init__(self, unet, vae, text_encoder, tokenizer):
        if len(getattr(unet, "up_blocks", [])) <= max(self.FEATURE_BLOCKS):
            raise ValueError(f"unet: expected an {self.NAME}-style UNet2DConditionModel with at least "
                             f"{max(self.FEATURE_BLOCKS) + 1} up blocks")
        decoder_self_attention_names(unet, self.BANK_BLOCKS)
        if getattr(vae.config, "latents_mean", None) is not None:
            raise ValueError("vae: a VAE with latents_mean/latents_std (e.g. Playground v2.5's) is not supported; "
                             "supported: a VAE scaled by its scaling_factor alone")
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.lock = model_lock(unet)
        self._bank = BankSlot()
        self.image_prompt = None  # an image_prompt.ImagePrompt once `load_image_prompt` ran
        self.prediction_type = "epsilon"
        self._alphas: torch.Tensor | None = None  # ᾱ per training timestep, for the v -> ε conversion

    # ------------------------------------------------------------------------------------------- loading

    @classmethod
    def plain_unet(cls, unet_config) -> bool:
        """A UNet conditioned on text alone (no class, time-id or image embeddings), on 4 latent channels."""
        return (unet_config.get("addition_embed_type") is None and unet_config.get("class_embed_type") is None
                and unet_config.get("in_channels", 4) == 4 and unet_config.get("encoder_hid_dim_type") is None)

    @classmethod
    def accepts(cls, unet_config) -> bool:
        """Whether a model with this UNet configuration has this backbone's layout (the prediction type is checked
        apart: every backbone handles each of PREDICTION_TYPES)."""
        return cls.plain_unet(unet_config) and not unet_config.get("use_linear_projection", False)

    @classmethod
    def from_components(cls, unet, vae, text_encoder, tokenizer, text_encoder_2=None, tokenizer_2=None):
        """The backbone of components built or loaded elsewhere (SD1.x and SD2.x take one text encoder)."""
        if text_encoder_2 is not None or tokenizer_2 is not None:
            raise TypeError(f"text_encoder_2/tokenizer_2: an {cls.NAME} model has one text encoder")
        return cls(unet, vae, text_encoder, tokenizer)

    def set_rule(self, rule) -> None:
        """The pipeline's step rule (a `steps.DDIMRule`): what the UNet predicts and the ᾱ table to turn v into ε."""
        super().set_rule(rule)
        self.set_prediction(rule.config.get("prediction_type", "epsilon"), rule.alphas_cumprod)

    def set_prediction(self, prediction_type: str, alphas_cumprod: torch.Tensor) -> None:
        """What the UNet predicts (the scheduler's `prediction_type`) and the ᾱ table of its training timesteps,
        so that `predict` can turn a v prediction into ε. Set by the pipeline from its scheduler."""
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"scheduler: prediction_type {prediction_type!r} is not supported; supported: "
                             f"{', '.join(PREDICTION_TYPES)}")
        self.prediction_type = prediction_type
        self._alphas = alphas_cumprod.detach().to(torch.float32).cpu()


    def describe(self) -> dict:
        """What `info`, sidecars and results say the model is."""
        return {"name": self.NAME, "prediction_type": self.prediction_type}

    @classmethod
    def from_pretrained(cls, source: str, *, use_safetensors=True, local_files_only: bool = False):
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        from .weights import load_component

        common = {"local_files_only": local_files_only}
        weights = {"use_safetensors": use_safetensors, **common}
        unet = load_component(UNet2DConditionModel, source, "unet", "unet", **weights)
        vae = load_component(AutoencoderKL, source, "vae", "vae", **weights)
        text_encoder = load_component(CLIPTextModel, source, "text_encoder", "text_encoder", **weights)
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **common)
        return cls(unet, vae, text_encoder, tokenizer)

    @property
    def modules(self) -> tuple[torch.nn.Module, ...]:
        extra = () if self.image_prompt is None else tuple(self.image_prompt.modules)
        return (self.unet, self.vae, self.text_encoder) + extra

    # -------------------------------------------------------------------------------------- image prompt

    def load_image_prompt(self, prompt) -> None:
        """Install an `image_prompt.ImagePrompt`'s processors on every cross-attention layer (replacing any
        adapter loaded before); its modules follow the backbone's device and dtype."""
        from .image_prompt import ImagePromptAttnProcessor

        with self.lock:
            self.unload_image_prompt()
            prompt.to(self.device, self.dtype)
            processors = dict(self.unet.attn_processors)
            for name, (to_k_ip, to_v_ip) in prompt.layers.items():
                processors[name] = ImagePromptAttnProcessor(prompt.slot, name.removesuffix(".processor"), to_k_ip,
                                                            to_v_ip)
            self.unet.set_attn_processor(processors)
            self.image_prompt = prompt

    def unload_image_prompt(self) -> None:
        """Plain cross-attention again (the processors diffusers installs by default)."""
        from diffusers.models.attention_processor import AttnProcessor2_0

        with self.lock:
            if self.image_prompt is None:
                return
            processors = dict(self.unet.attn_processors)
            for name in self.image_prompt.layers:
                processors[name] = AttnProcessor2_0()
            self.unet.set_attn_processor(processors)
            self.image_prompt = None

    def add_image_prompt(self, cond: "Conditioning", uncond: "Conditioning", images, *,
                         base_as_text: bool) -> tuple["Conditioning", "Conditioning"]:
        """cond / uncond with the image tokens of `images` (each the adapter's N tokens, concatenated) appended
        after the text. With several images and `base_as_text`, the first image's tokens are read through the text
        K/V (the official two-image behaviour); otherwise every image token goes through the adapter's K/V."""
        if self.image_prompt is None:
            raise ValueError("image_prompt: no IP-Adapter is loaded (pipe.load_ip_adapter(...), or --ip-adapter)")
        tokens, zero = self.image_prompt.embed(images)
        leading = self.image_prompt.tokens if base_as_text and len(images) > 1 else 0
        return (replace(cond, image_tokens=tokens.to(cond.text), image_text_tokens=leading),
                replace(uncond, image_tokens=zero.to(uncond.text), image_text_tokens=leading))

    @property
    def denoiser(self) -> torch.nn.Module:
        """The network that predicts noise (what locks, compilation and LoRAs act on): here the UNet."""
        return self.unet

    # --------------------------------------------------------------------------------------------- grids

    @property
    def feature_factor(self) -> int:
        """Feature-grid cells per latent cell."""
        return self.FEATURE_FACTOR

    @property
    def channels_last(self) -> bool:
        """Whether the UNet's and VAE's convolutions run channels-last (`set_channels_last`); moves and casts keep it."""
        weight = self.unet.conv_in.weight
        return weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()

    def set_channels_last(self, enabled: bool) -> None:
        """Channels-last weights for the UNet and VAE: their convolutions (and the activations after them) then run in
        oneDNN's faster layout on the CPU. Outputs move by about 1 grey level, so it is opt-in: the default layout
        keeps earlier releases' spec files and sidecars reproducing bit for bit."""
        layout = torch.channels_last if enabled else torch.contiguous_format
        for module in (self.unet, self.vae):
            module.to(memory_format=layout)

    @property
    def max_prompt_tokens(self) -> int:
        return self.tokenizer.model_max_length

    # ------------------------------------------------------------------------------------------ the model

    def forward(self, z: torch.Tensor, t, cond: Conditioning, stop_after: int | None = None):
        """The UNet on latents z at timestep t. Returns ε (fp32) or, with `stop_after=k`, the outputs of the up
        blocks up to k (model dtype, differentiable); up_blocks[k+1:], norm_out and conv_out are then not run.

        Written out (the stock UNet2DConditionModel.forward without ControlNet/adapter/GLIGEN inputs) so that the
        feature pass is a plain truncated call, not a full forward stopped by an exception: graph capture and
        compilation see one static function.
        """
        unet = self.unet
        sample = z.to(unet.dtype)
        context = cond.text.to(unet.dtype)
        if cond.image_tokens is not None:
            if self.image_prompt is None:
                raise ValueError("cond: image tokens given, but no image prompt (IP-Adapter) is loaded")
            context = torch.cat([context, cond.image_tokens.to(unet.dtype)], dim=1)
        if self.image_prompt is not None:  # what its processors read on this call
            slot = self.image_prompt.slot
            slot.ip_tokens = 0 if cond.image_tokens is None else cond.image_tokens.shape[1] - cond.image_text_tokens
            slot.scale = cond.image_scale if slot.ip_tokens else 0.0
        added = {k: v.to(unet.dtype) for k, v in cond.added.items()} or None
        upsample_factor = 2 ** unet.num_upsamplers
        forward_upsample_size = any(d % upsample_factor != 0 for d in sample.shape[-2:])
        if unet.config.center_input_sample:
            sample = 2 * sample - 1.0
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=t), None)
        aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=context, added_cond_kwargs=added)
        emb = emb + aug if aug is not None else emb
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        context = unet.process_encoder_hidden_states(encoder_hidden_states=context, added_cond_kwargs=added)
        sample = unet.conv_in(sample)
        skips = (sample,)
        for block in unet.down_blocks:
            if getattr(block, "has_cross_attention", False):
                sample, res = block(hidden_states=sample, temb=emb, encoder_hidden_states=context)
            else:
                sample, res = block(hidden_states=sample, temb=emb)
            skips += res
        if unet.mid_block is not None:
            if getattr(unet.mid_block, "has_cross_attention", False):
                sample = unet.mid_block(sample, emb, encoder_hidden_states=context)
            else:
                sample = unet.mid_block(sample, emb)
        outputs = []
        last = len(unet.up_blocks) - 1
        for i, block in enumerate(unet.up_blocks):
            res = skips[-len(block.resnets):]
            skips = skips[: -len(block.resnets)]
            size = skips[-1].shape[2:] if i < last and forward_upsample_size else None
            if getattr(block, "has_cross_attention", False):
                sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res,
                               encoder_hidden_states=context, upsample_size=size)
            else:
                sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res, upsample_size=size)
            if stop_after is not None:
                outputs.append(sample)
                if i == stop_after:
                    return outputs
        if unet.conv_norm_out:
            sample = unet.conv_act(unet.conv_norm_out(sample))
        return unet.conv_out(sample).float()

    def predict(self, z: torch.Tensor, t, cond: Conditioning) -> torch.Tensor:
        """The DDIM rule's prediction: ε in fp32, whatever the model's dtype and whatever the UNet predicts: a v
        prediction becomes ε = √ᾱ_t·v + √(1−ᾱ_t)·z_t here, so every ε/x0 formula downstream (inversion, guided sampling, time travel,
        regional SDE) is the ε one."""
        out = self.forward(z, t, cond)
        if self.prediction_type == "epsilon":
            return out
        if self._alphas is None:
            raise RuntimeError("backbone: a v-prediction model needs its ᾱ table (set_prediction) before predict")
        a_t = self._alphas[int(t)].to(out.device)
        return a_t.sqrt() * out + (1 - a_t).sqrt() * z.float()

    def features(self, z: torch.Tensor, t, cond: Conditioning) -> list[torch.Tensor]:
        """Guidance features (outputs of FEATURE_BLOCKS) at their native resolutions; differentiable."""
        outputs = self.forward(z, t, cond, stop_after=max(self.FEATURE_BLOCKS))
        return [outputs[i] for i in self.FEATURE_BLOCKS]

    # ------------------------------------------------------------------------------------ the memory bank

    def bank_layer_names(self) -> list[str]:
        """Processor names of the decoder self-attention layers the memory bank owns (of BANK_BLOCKS)."""
        return decoder_self_attention_names(self.unet, self.BANK_BLOCKS)

    def bank_bytes(self, latent_hw: tuple[int, int], steps: int, images: int = 1) -> int:
        """Bytes a memory bank of `images` images over `steps` steps will take, before capturing it."""
        return estimate_bank_bytes(self.unet, latent_hw, steps, images, blocks=self.BANK_BLOCKS)

    # ------------------------------------------------------------------------------------------- encoders

    @torch.no_grad()
    def condition(self, prompts: Sequence[str], size_hw: tuple[int, int] | None = None) -> Conditioning:
        """Conditioning of each prompt: (B, 77, C) last hidden states, padded to the tokenizer's max length.
        `size_hw` (the working size) is not read by SD1.x/SD2.x (SDXL's time ids are made from it)."""
        limit = self.tokenizer.model_max_length
        tokens = self.tokenizer(self._check_prompts(prompts), padding="max_length", max_length=limit,
                                truncation=True, return_tensors="pt")
        return Conditioning(text=self.text_encoder(tokens.input_ids.to(self.device))[0].float())

    def unconditional(self, size_hw: tuple[int, int] | None = None, n: int = 1) -> Conditioning:
        """The classifier-free guidance's unconditional branch: the empty prompt's conditioning."""
        return self.condition([""] * n, size_hw)

    def prompt_length(self, prompt: str) -> int:
        """Tokens of a prompt with its start/end tokens (what must fit in the text encoder's window)."""
        return len(self.tokenizer(check_prompt(prompt), truncation=False).input_ids)

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """VAE posterior mean x scaling factor (deterministic, as the official code)."""
        latent = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist.mean
        return latent.float() * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> np.ndarray:
        """(1, 4, h, w) latent -> (H, W, 3) uint8."""
        x = self.vae.decode((latent / self.vae.config.scaling_factor).to(self.vae.dtype), return_dict=False)[0]
        if not torch.isfinite(x).all():
            raise NonFiniteError(f"NaN/Inf in the VAE decode ({self.vae.dtype}); try dtype=torch.float32 for the VAE")
        x = (x.float() / 2 + 0.5).clamp(0, 1)
        return (x[0].permute(1, 2, 0).cpu().numpy() * 255.0).round().astype(np.uint8)


class SD2Backbone(SD1Backbone):
    """Stable Diffusion 2.x: SD1's block layout with linear projections in the transformer blocks and 64-channel
    attention heads, conditioned on OpenCLIP ViT-H text features (a transformers CLIPTextModel in diffusers layouts,
    read the same way: its last hidden state); ε (2.x-base, 512 px) or v-prediction (2.x, 768 px)."""

    NAME = "SD2.x"
    SUPPORTS = ("SD2.x: SD1's layout with linear projections (use_linear_projection), one OpenCLIP text encoder")

    @classmethod
    def accepts(cls, unet_config) -> bool:
        return cls.plain_unet(unet_config) and bool(unet_config.get("use_linear_projection", False))
