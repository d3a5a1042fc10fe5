"""Stable Diffusion 3 / 3.5 as a backbone: a stock diffusers `SD3Transformer2DModel` (MMDiT), a 16-channel
`AutoencoderKL` with shift and scale, CLIP-L + CLIP-G text encoders with projections and an optional T5 encoder.

What differs from the UNet backbones, and how it is handled here (the flow contract, /work/flow-contract.md):
- `predict` returns the transformer's velocity v in fp32, exactly what `StableDiffusion3Pipeline` feeds to
  `FlowMatchEulerDiscreteScheduler.step`; `t` is the scheduler's timestep value (σ·1000), as the pipeline passes it.
- Conditioning is built as the pipeline's `encode_prompt` builds it: the penultimate hidden states of both CLIPs,
  concatenated and zero-padded to the joint width, then T5's states along the sequence (zeros of
  `max_sequence_length` tokens when there is no T5, as diffusers does); the pooled projections of both CLIPs
  concatenated travel in `Conditioning.added["pooled"]`. The unconditional branch is the empty prompt (SD3 has no
  `force_zeros_for_empty_prompt`).
- One-CLIP layout (no text_encoder_2 in the folder; dragondiff's bundled `shapes-flow` model, not a diffusers
  pipeline layout): that CLIP's penultimate states and pooled projection alone, no T5 block unless a T5 is given.
- One explicit forward over the transformer's own modules (pos_embed, time_text_embed, context_embedder, the
  joint blocks, norm_out, proj_out, unpatchify), so that the feature pass stops after its last block.
- Features: the image tokens' hidden states after `feature_blocks`, on the patch grid (latent / patch_size).
  "dit" normalisation (DiTF): the AdaLN that reads those states next (the next block's norm1 with its timestep
  modulation, norm_out after the last block), then the massive-activation channels set to zero.
- Memory bank: on the joint attention (`block.attn`) of `bank_blocks`, the image tokens' K/V (first in SD3's joint
  sequence) go through the controller; the text K/V stay the current prompt's. SD3.5's image-only `attn2` (dual-
  attention blocks, 0-12 of 24 in SD3.5-Medium) is left plain: it sits almost only in the first half, outside the
  bank blocks, and SD3-Medium has none; joint attention is the self-attention every SD3 block has.
- Layer choices (no layer study exists for SD3; unverified on real weights): bank = the second half of the blocks
  (the decoder-like half, as the UNet's bank is its decoder); features after the blocks at 1/2 and 3/4 of depth
  (SD3.5-Medium: blocks 11 and 17 of 24). Both are taken from the configured depth, so tiny models work.
"""

from __future__ import annotations

import json
import math
from fractions import Fraction
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .attention import BankSlot
from .backbone import Conditioning, TransformerBackbone, drop_massive_channels, model_lock
from .errors import NonFiniteError
from .limits import check_prompt

SD3_CLASS = "SD3Transformer2DModel"
# Config keys that together identify an SD3 MMDiT when the class name is absent (FLUX has no caption projection).
SD3_KEYS = ("joint_attention_dim", "caption_projection_dim", "pooled_projection_dim", "pos_embed_max_size",
            "patch_size")


def blocks_for_depth(depth: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(feature blocks, bank blocks) for a transformer of `depth` joint blocks: features after the blocks that
    end 1/2 and 3/4 of the depth, the bank on the second half. SD3.5-Medium (24): (11, 17), (12, ..., 23)."""
    if depth < 1:
        raise ValueError(f"transformer: expected at least one transformer block, got {depth}")
    features = tuple(sorted({max(depth // 2 - 1, 0), max(3 * depth // 4 - 1, 0)}))
    bank = tuple(range(depth // 2, depth))
    return features, bank


class SD3BankProcessor:
    """Joint attention (JointAttnProcessor2_0's math) whose image K/V pass through the slot's controller.

    The controller sees the image tokens' key and value (B, N_img, C) before the head split and may return another
    token count (CONCAT, UNION); queries stay the layer's own image + text tokens, so the outputs keep their length
    and split at N_img as the stock processor splits them.
    """

    def __init__(self, slot: BankSlot, layer: str):
        self.slot = slot
        self.layer = layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if attention_mask is not None:
            raise RuntimeError(f"{self.layer}: the memory-bank processor takes no attention mask")
        batch, n_img = hidden_states.shape[:2]
        query = attn.to_q(hidden_states)
        key, value = attn.to_k(hidden_states), attn.to_v(hidden_states)
        if self.slot.controller is not None:
            key, value = self.slot.controller.transform(self.layer, key, value)
        head_dim = query.shape[-1] // attn.heads

        def heads(x):
            return x.reshape(batch, -1, attn.heads, head_dim).transpose(1, 2)

        query, key, value = heads(query), heads(key), heads(value)
        if attn.norm_q is not None:  # SD3.5's RMS norms act per token and head: after the bank is the same
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:  # the text tokens, appended after the image tokens
            c_query = heads(attn.add_q_proj(encoder_hidden_states))
            c_key = heads(attn.add_k_proj(encoder_hidden_states))
            c_value = heads(attn.add_v_proj(encoder_hidden_states))
            if attn.norm_added_q is not None:
                c_query = attn.norm_added_q(c_query)
            if attn.norm_added_k is not None:
                c_key = attn.norm_added_k(c_key)
            query = torch.cat([query, c_query], dim=2)
            key, value = torch.cat([key, c_key], dim=2), torch.cat([value, c_value], dim=2)
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        context = None
        if encoder_hidden_states is not None:
            out, context = out[:, :n_img], out[:, n_img:]
            if not attn.context_pre_only:
                context = attn.to_add_out(context)
        out = attn.to_out[1](attn.to_out[0](out))
        return out if context is None else (out, context)


class SD3Backbone(TransformerBackbone):
    """Stable Diffusion 3 / 3.5 (Medium, Large): SD3Transformer2DModel, 16-channel VAE, two CLIPs, optional T5."""

    NAME = "SD3"
    SUPPORTS = ("SD3/SD3.5: an SD3Transformer2DModel (joint attention, optional dual attention and q/k norms), an "
                "AutoencoderKL whose latent channels match it, CLIP-L + CLIP-G with projections, optional T5")
    CLASS_NAME = SD3_CLASS  # its transformer's diffusers class
    BANK_PROCESSOR = SD3BankProcessor
    REPEATED_BLOCKS = ("JointTransformerBlock",)  # SD3Transformer2DModel declares no `_repeated_blocks`
    # None: chosen from the transformer's depth by `blocks_for_depth` (a subclass may fix them).
    FEATURE_BLOCKS: tuple[int, ...] | None = None
    BANK_BLOCKS: tuple[int, ...] | None = None
    # GPU bytes per latent cell of the largest pass (guidance: feature pass to block 17 of 24 with its backward) in
    # 16-bit for SD3.5-Medium: `dragondiff bench memory --model sd35m-shaped` on fake tensors, 5.65 GiB at 1024 px,
    # 0.92 GiB with gradient checkpointing (docs/results/memory-flow-1024.json).
    ACTIVATION_BYTES_PER_CELL = 5.65 * 2**30 / 128**2
    CHECKPOINTED_BYTES_PER_CELL = 0.92 * 2**30 / 128**2
    T5_TOKENS = 256  # StableDiffusion3Pipeline's default max_sequence_length

    def __init__(self, transformer, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2,
                 text_encoder_3=None, tokenizer_3=None, *, max_sequence_length: int | None = None,
                 feature_norm: str = "dit"):
        self._check_parts(transformer, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, text_encoder_3,
                          tokenizer_3)
        self.transformer, self.vae = transformer, vae
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.text_encoder_3, self.tokenizer_3 = text_encoder_3, tokenizer_3
        # No T5 block for the one-CLIP layout without a T5: it trained without one.
        one_clip = text_encoder_2 is None and text_encoder_3 is None
        self.max_sequence_length = 0 if one_clip else int(max_sequence_length or self.T5_TOKENS)
        depth = len(transformer.transformer_blocks)
        features, bank = blocks_for_depth(depth)
        self.feature_blocks = tuple(self.FEATURE_BLOCKS) if self.FEATURE_BLOCKS is not None else features
        self.bank_blocks = tuple(self.BANK_BLOCKS) if self.BANK_BLOCKS is not None else bank
        for name, blocks in (("FEATURE_BLOCKS", self.feature_blocks), ("BANK_BLOCKS", self.bank_blocks)):
            if not blocks or not all(0 <= b < depth for b in blocks):
                raise ValueError(f"transformer: {name} {list(blocks)} do not fit its {depth} blocks")
        self.feature_norm = feature_norm
        self.lock = model_lock(transformer)
        self._bank = BankSlot()
        self.image_prompt = None

    @staticmethod
    def _check_parts(transformer, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, text_encoder_3,
                     tokenizer_3) -> None:
        """Refuse, by the part's name, components that do not fit together as SD3's do."""
        cfg = transformer.config
        if not SD3Backbone.accepts(dict(cfg)) or not hasattr(transformer, "transformer_blocks"):
            raise ValueError(f"transformer: expected an {SD3_CLASS}, got {type(transformer).__name__}")
        if text_encoder is None or tokenizer is None:
            raise ValueError("text_encoder: an SD3 model needs a CLIP text encoder with its tokenizer")
        if (text_encoder_2 is None) != (tokenizer_2 is None):
            raise ValueError("text_encoder_2: give the second CLIP together with its tokenizer (tokenizer_2), or "
                             "neither (the one-CLIP layout)")
        if (text_encoder_3 is None) != (tokenizer_3 is None):
            raise ValueError("text_encoder_3: give the T5 encoder together with its tokenizer (tokenizer_3), or "
                             "neither")
        if vae.config.latent_channels != cfg.in_channels:
            raise ValueError(f"vae: latent_channels {vae.config.latent_channels} differ from the transformer's "
                             f"in_channels {cfg.in_channels}")
        if getattr(vae.config, "latents_mean", None) is not None:
            raise ValueError("vae: a VAE with latents_mean/latents_std is not supported; supported: a VAE with "
                             "shift_factor and scaling_factor (SD3's)")
        clips = [e for e in (text_encoder, text_encoder_2) if e is not None]
        for e in clips:
            if getattr(e.config, "projection_dim", None) is None or not hasattr(e, "text_projection"):
                raise ValueError(f"text_encoder: expected a CLIP text encoder with a projection "
                                 f"(CLIPTextModelWithProjection), got {type(e).__name__}")
        pooled = sum(e.config.projection_dim for e in clips)
        if pooled != cfg.pooled_projection_dim:
            raise ValueError(f"text_encoder_2: the CLIP projections give {pooled} pooled channels; the "
                             f"transformer's pooled_projection_dim is {cfg.pooled_projection_dim}")
        clip = sum(e.config.hidden_size for e in clips)
        if clip > cfg.joint_attention_dim:
            raise ValueError(f"text_encoder_2: the CLIPs' {clip} channels exceed the transformer's "
                             f"joint_attention_dim {cfg.joint_attention_dim}")
        if text_encoder_3 is not None and text_encoder_3.config.d_model != cfg.joint_attention_dim:
            raise ValueError(f"text_encoder_3: T5 width {text_encoder_3.config.d_model} differs from the "
                             f"transformer's joint_attention_dim {cfg.joint_attention_dim}")

    # ------------------------------------------------------------------------------------------- loading

    @classmethod
    def accepts(cls, transformer_config) -> bool:
        """An SD3Transformer2DModel configuration: its class name when the config has one (SD3's ControlNet shares
        the keys), else the keys that identify it."""
        name = transformer_config.get("_class_name")
        if name is not None:
            return name == SD3_CLASS
        return all(k in transformer_config for k in SD3_KEYS)

    @classmethod
    def from_components(cls, transformer, vae, text_encoder, tokenizer, text_encoder_2=None, tokenizer_2=None,
                        text_encoder_3=None, tokenizer_3=None):
        """The backbone of components built or loaded elsewhere (T5 optional, as diffusers allows)."""
        return cls(transformer, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, text_encoder_3,
                   tokenizer_3)

    @classmethod
    def from_pretrained(cls, source: str, *, use_safetensors=True, local_files_only: bool = False):
        """A diffusers SD3 folder or hub id; T5 is loaded when model_index.json lists a text_encoder_3, the second
        CLIP unless it says there is none (the one-CLIP layout)."""
        from diffusers import AutoencoderKL, SD3Transformer2DModel
        from transformers import AutoTokenizer, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel

        from .weights import load_component

        common = {"local_files_only": local_files_only}
        weights = {"use_safetensors": use_safetensors, **common}
        transformer = load_component(SD3Transformer2DModel, source, "transformer", "transformer", **weights)
        vae = load_component(AutoencoderKL, source, "vae", "vae", **weights)
        clips = ("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")
        if cls._index_lists(source, "text_encoder_2", local_files_only) is False:
            clips = clips[:1]
        encoders = [load_component(CLIPTextModelWithProjection, source, name, name, **weights) for name, _ in clips]
        tokenizers = [CLIPTokenizer.from_pretrained(source, subfolder=name, **common) for _, name in clips]
        encoders, tokenizers = encoders + [None], tokenizers + [None]  # no second CLIP: None
        t5 = t5_tokenizer = None
        if cls._index_lists(source, "text_encoder_3", local_files_only):
            t5 = load_component(T5EncoderModel, source, "text_encoder_3", "text_encoder_3", **weights)
            t5_tokenizer = AutoTokenizer.from_pretrained(source, subfolder="tokenizer_3", **common)
        return cls(transformer, vae, encoders[0], tokenizers[0], encoders[1], tokenizers[1], t5, t5_tokenizer)

    @staticmethod
    def _index_lists(source: str, component: str, local_files_only: bool) -> bool | None:
        """Whether the folder's model_index.json names a class for `component` (diffusers writes [null, null] for
        an optional component left out); None when it does not mention it."""
        from pathlib import Path

        path = Path(source) / "model_index.json"
        if not path.is_file():
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(source, "model_index.json", local_files_only=local_files_only))
        index = json.loads(path.read_text())
        if component not in index:
            return None
        entry = index[component]
        return isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] is not None

    def describe(self) -> dict:
        """What `info`, sidecars and results say the model is."""
        cfg = self.transformer.config
        return {"name": self.NAME, "prediction_type": "flow", "t5": self.text_encoder_3 is not None,
                "clips": 2 if self.text_encoder_2 is not None else 1,
                "dual_attention": bool(cfg.dual_attention_layers), "blocks": len(self.transformer.transformer_blocks),
                "feature_blocks": list(self.feature_blocks), "bank_blocks": list(self.bank_blocks),
                "feature_norm": self.feature_norm}

    @property
    def denoiser(self) -> torch.nn.Module:
        """The transformer: what locks, compilation and LoRA act on."""
        return self.transformer

    @property
    def modules(self) -> tuple[torch.nn.Module, ...]:
        encoders = (self.text_encoder, self.text_encoder_2, self.text_encoder_3)
        return (self.transformer, self.vae) + tuple(e for e in encoders if e is not None)



    # --------------------------------------------------------------------------------------------- grids


    @property
    def patch_size(self) -> int:
        return self.transformer.config.patch_size

    @property
    def vae_factor(self) -> int:
        """Pixels per latent cell, as diffusers' `vae_scale_factor`."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def feature_factor(self) -> Fraction:
        """Feature-grid cells per latent cell: one token per patch."""
        return self.grid_factor(self.transformer.config)

    @classmethod
    def grid_factor(cls, config) -> Fraction:
        return Fraction(1, int(config.get("patch_size", 2)))

    @property
    def max_feature_block(self) -> int:
        return max(self.feature_blocks)

    @property
    def max_prompt_tokens(self) -> int:
        """The CLIP window (77), which every CLIP reads; T5 reads up to `max_sequence_length` of the same prompt."""
        return self.tokenizer.model_max_length

    # ------------------------------------------------------------------------------------------ the model

    def _timestep(self, t, batch: int, device) -> torch.Tensor:
        """t as the pipeline passes it: a float32 tensor of the scheduler's timestep, one per sample."""
        t = torch.as_tensor(t, dtype=torch.float32, device=device).reshape(-1)
        return t.expand(batch) if t.numel() == 1 else t

    def forward(self, z: torch.Tensor, t, cond: Conditioning, stop_after: int | None = None):
        """The transformer on latents z at timestep t. Returns v (fp32, same shape as z) or, with `stop_after=k`,
        ({block index: image tokens (B, N, C) after it} up to k, temb), later blocks not run.

        Written out (SD3Transformer2DModel.forward without ControlNet residuals, skip layers and IP-Adapter) so that
        the feature pass is a plain truncated call."""
        tr = self.transformer
        if cond.image_tokens is not None:
            raise ValueError(f"cond: image tokens given, but {self.NAME} has no image-prompt support")
        height, width = z.shape[-2:]
        patch = self.patch_size
        if height % patch or width % patch:
            raise ValueError(f"z: latent size {height}x{width} is not a multiple of the patch size {patch}")
        hidden = tr.pos_embed(z.to(tr.dtype)).contiguous()  # patchify + cropped position embedding
        temb = tr.time_text_embed(self._timestep(t, z.shape[0], z.device), cond.added["pooled"].to(tr.dtype))
        context = tr.context_embedder(cond.text.to(tr.dtype))
        # diffusers' own checkpointing switch (`enable_gradient_checkpointing`), as the stock forward reads it.
        checkpoint = torch.is_grad_enabled() and tr.gradient_checkpointing
        outputs = {}
        for i, block in enumerate(tr.transformer_blocks):
            if checkpoint:
                context, hidden = tr._gradient_checkpointing_func(block, hidden, context, temb, None)
            else:
                context, hidden = block(hidden_states=hidden, encoder_hidden_states=context, temb=temb)
            if stop_after is not None:
                outputs[i] = hidden
                if i == stop_after:
                    return outputs, temb
        hidden = tr.proj_out(tr.norm_out(hidden, temb))
        return self._unpatchify(hidden, height, width).float()

    def _unpatchify(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(B, N, p·p·C) tokens -> (B, C, H, W) latent, as the stock forward does."""
        p, c = self.patch_size, self.transformer.out_channels
        x = tokens.reshape(tokens.shape[0], height // p, width // p, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(tokens.shape[0], c, height, width)

    def predict(self, z: torch.Tensor, t, cond: Conditioning) -> torch.Tensor:
        """Velocity v (fp32): x_next = x + (σ_next − σ)·v, x̂0 = x − σ·v."""
        return self.forward(z, t, cond)

    def features(self, z: torch.Tensor, t, cond: Conditioning) -> list[torch.Tensor]:
        """Image tokens after each of `feature_blocks` on the patch grid, (B, C, h/p, w/p), model dtype,
        differentiable; normalised as `feature_norm` says. The blocks after the last one are not run."""
        outputs, temb = self.forward(z, t, cond, stop_after=self.max_feature_block)
        grid = (z.shape[-2] // self.patch_size, z.shape[-1] // self.patch_size)
        maps = []
        for i in self.feature_blocks:
            tokens = outputs[i]
            if self.feature_norm == "dit":
                tokens = drop_massive_channels(self._adaln(i, tokens, temb), tokens)
            maps.append(tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid))
        return maps

    def _adaln(self, block: int, tokens: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """The AdaLN that reads block `block`'s output next: the following block's norm1 (layer norm without affine,
        then its timestep scale and shift for the attention input), or norm_out after the last block. Only the
        norm's small temb projection runs, not the block."""
        blocks = self.transformer.transformer_blocks
        if block + 1 < len(blocks):
            return blocks[block + 1].norm1(tokens, emb=temb)[0]
        return self.transformer.norm_out(tokens, temb)

    # ------------------------------------------------------------------------------------ the memory bank

    def bank_layer_names(self) -> list[str]:
        """Processor names of the joint attentions the bank covers, in block order."""
        return [f"transformer_blocks.{i}.attn.processor" for i in self.bank_blocks]

    def bank_bytes(self, latent_hw: tuple[int, int], steps: int, images: int = 1) -> int:
        """Bytes of a bank of `images` images over `steps` steps: image K and V of every bank block, per step."""
        p = self.patch_size
        tokens = math.ceil(latent_hw[0] / p) * math.ceil(latent_hw[1] / p)
        size = torch.finfo(self.dtype).bits // 8
        blocks = self.transformer.transformer_blocks
        per_step = sum(2 * tokens * blocks[i].attn.to_k.out_features * size for i in self.bank_blocks)
        return per_step * steps * images

    # ------------------------------------------------------------------------------------------- encoders


    def _clip(self, encoder, tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Penultimate hidden states (B, 77, C) and pooled projection (B, P) of one CLIP, as the pipeline reads it."""
        ids = tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        out = encoder(ids.to(self.device), output_hidden_states=True)
        return out.hidden_states[-2], out[0]

    def _t5(self, prompts: list[str]) -> torch.Tensor:
        """T5's last hidden states (B, max_sequence_length, joint width), or zeros without T5 (as diffusers)."""
        if self.text_encoder_3 is None:
            width = self.transformer.config.joint_attention_dim
            return torch.zeros(len(prompts), self.max_sequence_length, width, device=self.device)
        ids = self.tokenizer_3(prompts, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                               add_special_tokens=True, return_tensors="pt").input_ids
        return self.text_encoder_3(ids.to(self.device))[0]

    @torch.no_grad()
    def condition(self, prompts: Sequence[str], size_hw: tuple[int, int] | None = None) -> Conditioning:
        """text (B, 77 + max_sequence_length, joint width) and added["pooled"] (B, P), fp32, as the pipeline's
        encode_prompt builds prompt_embeds and pooled_prompt_embeds. `size_hw` is not read."""
        prompts = self._check_prompts(prompts)
        clips = [self._clip(e, tok, prompts) for e, tok in ((self.text_encoder, self.tokenizer),
                                                            (self.text_encoder_2, self.tokenizer_2)) if e is not None]
        t5 = self._t5(prompts)
        clip = torch.cat([states.float() for states, _ in clips], dim=-1)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))  # zero channels up to the joint width
        text = torch.cat([clip, t5.float()], dim=-2)
        return Conditioning(text=text, added={"pooled": torch.cat([p for _, p in clips], dim=-1).float()})

    def unconditional(self, size_hw: tuple[int, int] | None = None, n: int = 1) -> Conditioning:
        """The empty prompt's conditioning (the pipeline's default negative prompt)."""
        return self.condition([""] * n, size_hw)

    def prompt_length(self, prompt: str) -> int:
        """CLIP tokens of a prompt with its start/end tokens (what must fit in the CLIP window)."""
        return len(self.tokenizer(check_prompt(prompt), truncation=False).input_ids)

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(posterior mean − shift_factor) · scaling_factor, fp32 (deterministic)."""
        cfg = self.vae.config
        latent = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist.mean.float()
        return (latent - (cfg.shift_factor or 0.0)) * cfg.scaling_factor

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> np.ndarray:
        """(1, C, h, w) latent -> (H, W, 3) uint8 (the pipeline's latent / scaling_factor + shift_factor)."""
        cfg = self.vae.config
        latent = latent / cfg.scaling_factor + (cfg.shift_factor or 0.0)
        x = self.vae.decode(latent.to(self.device, self.vae.dtype), return_dict=False)[0]
        if not torch.isfinite(x).all():
            raise NonFiniteError(f"NaN/Inf in the VAE decode ({self.vae.dtype}); try dtype=torch.float32 for the VAE")
        x = (x.float() / 2 + 0.5).clamp(0, 1)
        return (x[0].permute(1, 2, 0).cpu().numpy() * 255.0).round().astype(np.uint8)
