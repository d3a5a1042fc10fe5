"""FLUX.1 as a backbone: diffusers' FluxTransformer2DModel, a 16-channel VAE with shift and scale, CLIP + T5 text.

How FLUX differs from the UNet backbones, and how it is handled here:
- The sampler sees latents (B, 16, h, w). The transformer reads tokens: each 2x2 block of latent cells packed into
  one 64-channel token (FluxPipeline._pack_latents), positioned by 3-axis RoPE ids (0, row, col) of the token grid;
  text tokens have ids (0, 0, 0). `predict` packs, runs, unpacks: it returns the velocity v (fp32, (B, 16, h, w)) the
  pipeline hands to FlowMatchEulerDiscreteScheduler.step. h and w must be even.
- Time: `t` is the scheduler's timestep (σ·1000); the transformer is given t/1000 as the pipeline gives it (it
  multiplies by 1000 again inside). FLUX.1-dev is guidance-distilled: the guidance scale is an input, embedded like
  the time (`embedded_guidance`, 3.5 by default as the pipeline's). True CFG (a negative prompt, twice the cost) is
  the sampler's business: `unconditional` gives the empty prompt's conditioning as the pipeline encodes it.
- Timestep-distilled transformers (FLUX.1-schnell-type, no guidance embedding) are refused: they are sampled in 1-4
  steps, which leaves almost no steps for step-wise energy guidance or a memory bank over the trajectory.
- Conditioning: T5's token states in `text` (B, L, 4096; L = 512 for FLUX.1-dev), CLIP's pooled output in
  `added["pooled"]` (B, 768), exactly as FluxPipeline.encode_prompt returns them.
- One token sequence per attention: text FIRST, then image. Double-stream blocks pass text and image apart
  (`encoder_hidden_states`); single-stream blocks get them joined, so the bank processor learns the text length from
  this backbone's slot (`FluxBankSlot.text_tokens`, set at every forward), not from attention kwargs (which diffusers
  drops with a warning when a processor does not declare them).

Layer choices (FEATURE_BLOCKS, BANK_BLOCKS) are addressed relative to the depth, so the same setting picks
FLUX.1-dev's blocks and a tiny test model's:
- Features: the last two double-stream blocks (17 and 18 of 19 in FLUX.1-dev): DragFlow swept all 57 blocks for drag
  correspondence and found double-stream blocks beat single-stream ones, best 17/18. Feature grid: one cell per
  token, i.e. per 2x2 latent cells (`feature_factor` 1/2).
- Memory bank: the self-attention K/V of the image tokens in the second half of the single-stream blocks (19 of 38
  in FLUX.1-dev, blocks 38-56 of 57). DragonDiffusion banks the UNet decoder's self-attention, the output half of
  the network where appearance is written; training-free FLUX editors inject attention features in late
  single-stream blocks (RF-Edit, FireFlow; LazyDrag's attention control is in single-stream layers). Half the single
  blocks halves the memory: per step and image at 1024 px (4096 image tokens, 3072 channels, K and V, bf16)
  19 x 2 x 4096 x 3072 x 2 B = 956 MB (0.89 GiB); 26.8 GB over 28 steps, 47.8 GB over 50. The bank belongs on the CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .attention import BankSlot
from .backbone import MASSIVE_RATIO, Conditioning, TransformerBackbone, drop_massive_channels, model_lock
from .errors import NonFiniteError
from .limits import check_prompt



@dataclass(frozen=True)
class BlockSpan:
    """The blocks of one stream ("double" or "single") from fraction `start` to `stop` of its depth."""

    stream: str
    start: float
    stop: float = 1.0

    def indices(self, depth: int) -> range:
        return range(math.floor(self.start * depth), math.ceil(self.stop * depth))


@dataclass
class FluxBankSlot(BankSlot):
    """The bank slot plus the text length of the current forward (single-stream blocks see text and image joined)."""

    text_tokens: int = 0


def pack(z: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) latents -> (B, h/2 * w/2, 4C) tokens, as FluxPipeline._pack_latents (row-major token order)."""
    b, c, h, w = z.shape
    return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of `pack` (FluxPipeline._unpack_latents on the latent size)."""
    b, _, c4 = tokens.shape
    return tokens.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


def image_ids(rows: int, cols: int, device) -> torch.Tensor:
    """RoPE ids (0, row, col) of a rows x cols token grid, row-major (FluxPipeline._prepare_latent_image_ids)."""
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(cols)[None, :]
    return ids.reshape(rows * cols, 3).to(device)


class FluxBankAttnProcessor:
    """FLUX joint attention (FluxAttnProcessor's math) with the image tokens' K/V routed through the slot's controller.

    Keys are taken after the q/k RMS norm and RoPE, so a banked key keeps the position it was computed at wherever it
    is used. Text K/V stay as they are; every query (text and image) attends over [text K/V, transformed image K/V],
    whose image part may have another length than the queries' (CONCAT, UNION).
    """

    def __init__(self, slot: FluxBankSlot, layer: str):
        self.slot = slot
        self.layer = layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if attention_mask is not None:
            raise RuntimeError(f"{self.layer}: the memory-bank processor does not take an attention mask")
        heads = (-1, attn.head_dim)
        query = attn.norm_q(attn.to_q(hidden_states).unflatten(-1, heads))
        key = attn.norm_k(attn.to_k(hidden_states).unflatten(-1, heads))
        value = attn.to_v(hidden_states).unflatten(-1, heads)
        double = encoder_hidden_states is not None
        if double:  # double-stream block: text comes apart, projected by the added projections, and goes first
            text = encoder_hidden_states
            query = torch.cat([attn.norm_added_q(attn.add_q_proj(text).unflatten(-1, heads)), query], dim=1)
            key = torch.cat([attn.norm_added_k(attn.add_k_proj(text).unflatten(-1, heads)), key], dim=1)
            value = torch.cat([attn.add_v_proj(text).unflatten(-1, heads), value], dim=1)
            text_tokens = text.shape[1]
        else:
            text_tokens = self.slot.text_tokens
        if image_rotary_emb is not None:
            from diffusers.models.embeddings import apply_rotary_emb  # the stock RoPE, as FluxAttnProcessor applies it

            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        controller = self.slot.controller
        if controller is not None:
            if not double and text_tokens <= 0:
                raise RuntimeError(f"{self.layer}: the text length of the joined sequence is unknown")
            k_img, v_img = controller.transform(self.layer, key[:, text_tokens:].flatten(2),
                                                value[:, text_tokens:].flatten(2))
            key = torch.cat([key[:, :text_tokens], k_img.unflatten(-1, heads)], dim=1)
            value = torch.cat([value[:, :text_tokens], v_img.unflatten(-1, heads)], dim=1)
        out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
        out = out.transpose(1, 2).flatten(2, 3).to(query.dtype)
        if not double:
            return out
        text_out, image_out = out[:, :text_tokens], out[:, text_tokens:]
        image_out = attn.to_out[1](attn.to_out[0](image_out.contiguous()))
        return image_out, attn.to_add_out(text_out.contiguous())


class FluxBackbone(TransformerBackbone):
    """FLUX.1-dev-type models: FluxTransformer2DModel with a guidance embedding, a 16-channel VAE, CLIP + T5."""

    NAME = "FLUX.1"
    SUPPORTS = ("FLUX.1: a guidance-distilled FluxTransformer2DModel (FLUX.1-dev-type, guidance_embeds) with "
                "patch_size 1 on 4 x the VAE's latent channels, CLIP (pooled) + T5 text encoders")
    CLASS_NAME = "FluxTransformer2DModel"  # its transformer's diffusers class
    BANK_PROCESSOR = FluxBankAttnProcessor
    EMBEDDED_GUIDANCE = True  # guidance-distilled: with guidance_scale 1 the sampler runs the conditional branch only
    # Double-stream blocks counted from the end of the double stream: FLUX.1-dev's 17 and 18 (DragFlow's best).
    FEATURE_BLOCKS = (-2, -1)
    FEATURE_FACTOR = Fraction(1, 2)  # one feature cell per token = per 2x2 latent cells
    BANK_BLOCKS = BlockSpan("single", 0.5)  # the second half of the single-stream blocks (module docstring)
    # Massive-activation channels: mean |x| over the tokens above this multiple of the median channel's
    # (backbone.MASSIVE_RATIO says why 10; massive activations in DiTs and LLMs are ~1000x, Sun et al. 2024).
    MASSIVE_K = MASSIVE_RATIO
    # GPU bytes per latent cell of the guidance pass (double blocks 0-18 with gradient, no single blocks) in 16-bit:
    # `dragondiff bench memory --model flux-shaped` on fake tensors, 7.91 GiB at 1024 px, 1.73 GiB with gradient
    # checkpointing (docs/results/memory-flow-1024.json).
    ACTIVATION_BYTES_PER_CELL = 7.91 * 2**30 / 128**2
    CHECKPOINTED_BYTES_PER_CELL = 1.73 * 2**30 / 128**2
    DEFAULT_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale, the dev model's usual value
    MAX_T5_TOKENS = 512  # FluxPipeline refuses max_sequence_length > 512

    def __init__(self, transformer, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2):
        cfg = transformer.config
        if not all(hasattr(transformer, n) for n in ("transformer_blocks", "single_transformer_blocks", "x_embedder")):
            raise ValueError(f"transformer: expected a FluxTransformer2DModel, got {type(transformer).__name__}")
        self.check_config(cfg)
        if cfg.get("patch_size", 1) != 1 or (cfg.get("out_channels") or cfg.in_channels) != cfg.in_channels:
            raise ValueError("transformer: expected patch_size 1 and out_channels = in_channels (FLUX.1-dev's "
                             "layout; Fill/Canny/Depth variants with extra input channels are not supported)")
        latent = vae.config.latent_channels
        if 4 * latent != cfg.in_channels:
            raise ValueError(f"vae: {latent} latent channels x 4 (2x2 packed) = {4 * latent} differ from the "
                             f"transformer's in_channels {cfg.in_channels}")
        if text_encoder_2 is None or tokenizer_2 is None:
            raise ValueError("text_encoder_2: FLUX needs its T5 text encoder and tokenizer (text_encoder_2, "
                             "tokenizer_2)")
        if len(transformer.transformer_blocks) < max(-b if b < 0 else b + 1 for b in self.FEATURE_BLOCKS):
            raise ValueError(f"transformer: {len(transformer.transformer_blocks)} double-stream blocks; the feature "
                             f"blocks {self.FEATURE_BLOCKS} need more")
        self.transformer, self.vae = transformer, vae
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.lock = model_lock(transformer)
        self._bank = FluxBankSlot()
        self.image_prompt = None
        self.embedded_guidance = self.DEFAULT_GUIDANCE
        self.bank_layer_names()  # refuses a transformer without bank blocks

    # ------------------------------------------------------------------------------------------- loading

    @classmethod
    def check_config(cls, cfg) -> None:
        """Refuse a timestep-distilled transformer by name (before any weight is read)."""
        if not cfg.get("guidance_embeds", False):
            raise ValueError(
                "transformer: a timestep-distilled FLUX transformer (no guidance embedding: FLUX.1-schnell-type) is "
                "not supported: it samples in 1-4 steps, too few for step-wise energy guidance and a memory bank; "
                "use a guidance-distilled FLUX.1-dev-type model")

    @classmethod
    def accepts(cls, transformer_config) -> bool:
        """Whether a transformer configuration is FLUX's layout (timestep-distilled ones too: the constructor refuses
        those by name)."""
        name = transformer_config.get("_class_name")
        if name is not None:
            return name == cls.CLASS_NAME
        return "num_single_layers" in transformer_config and "axes_dims_rope" in transformer_config

    @classmethod
    def from_components(cls, transformer, vae, text_encoder, tokenizer, text_encoder_2=None, tokenizer_2=None,
                        text_encoder_3=None, tokenizer_3=None):
        if text_encoder_3 is not None or tokenizer_3 is not None:
            raise TypeError(f"text_encoder_3/tokenizer_3: a {cls.NAME} model has two text encoders (CLIP and T5)")
        return cls(transformer, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2)

    @classmethod
    def from_pretrained(cls, source: str, *, use_safetensors=True, local_files_only: bool = False):
        """A diffusers FLUX folder or hub id: transformer, vae, text_encoder, tokenizer, text_encoder_2,
        tokenizer_2 subfolders."""
        from diffusers import AutoencoderKL, FluxTransformer2DModel
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, T5EncoderModel

        from .weights import load_component

        common = {"local_files_only": local_files_only}
        weights = {"use_safetensors": use_safetensors, **common}
        transformer = load_component(FluxTransformer2DModel, source, "transformer", "transformer", **weights)
        vae = load_component(AutoencoderKL, source, "vae", "vae", **weights)
        text_encoder = load_component(CLIPTextModel, source, "text_encoder", "text_encoder", **weights)
        text_encoder_2 = load_component(T5EncoderModel, source, "text_encoder_2", "text_encoder_2", **weights)
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **common)
        tokenizer_2 = AutoTokenizer.from_pretrained(source, subfolder="tokenizer_2", **common)
        return cls(transformer, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2)

    def describe(self) -> dict:
        return {"name": self.NAME, "prediction_type": self.prediction_type, "t5": True,
                "embedded_guidance": self.embedded_guidance, "feature_norm": self.feature_norm,
                "feature_blocks": [f"double {i}" for i in self.feature_block_indices()],
                "bank_blocks": f"single {self.BANK_BLOCKS.start:g}-{self.BANK_BLOCKS.stop:g} of the depth"}

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.transformer

    @property
    def modules(self) -> tuple[torch.nn.Module, ...]:
        return (self.transformer, self.vae, self.text_encoder, self.text_encoder_2)


    @property
    def feature_factor(self) -> Fraction:
        """Feature-grid cells per latent cell: one token per 2x2 latent cells."""
        return self.FEATURE_FACTOR

    # ------------------------------------------------------------------------------------------ the model

    def feature_block_indices(self) -> list[int]:
        """FEATURE_BLOCKS as indices into the double-stream blocks, in order."""
        depth = len(self.transformer.transformer_blocks)
        return sorted({b % depth for b in self.FEATURE_BLOCKS})

    @property
    def max_feature_block(self) -> int:
        return self.feature_block_indices()[-1]

    def forward(self, z: torch.Tensor, t, cond: Conditioning, stop_after: int | None = None):
        """The transformer on latents z (B, C, h, w) at scheduler timestep t (σ·1000). Returns v (fp32, z's shape)
        or, with `stop_after=k`, (image-token states after each double-stream block up to k, temb): the blocks
        after k, the single-stream blocks, norm_out and proj_out are then not run.

        Written out over the transformer's own modules (FluxTransformer2DModel.forward without ControlNet or
        IP-Adapter inputs) so the feature pass is a plain truncated call.
        """
        tr = self.transformer
        b, c, h, w = z.shape
        if c != self.latent_channels or h % 2 or w % 2:
            raise ValueError(f"z: expected (B, {self.latent_channels}, h, w) latents with even h and w (FLUX packs "
                             f"2x2 latent cells into one token), got {tuple(z.shape)}")
        dtype = tr.dtype
        hidden = tr.x_embedder(pack(z.to(dtype)))
        # As FluxPipeline: timestep t/1000 in the latents' dtype; the transformer multiplies by 1000 again.
        timestep = (torch.as_tensor(t, device=z.device).expand(b).to(dtype) / 1000).to(dtype) * 1000
        guidance = torch.full([b], float(self.embedded_guidance), device=z.device, dtype=torch.float32)
        temb = tr.time_text_embed(timestep, guidance.to(dtype) * 1000, cond.added["pooled"].to(dtype))
        context = tr.context_embedder(cond.text.to(dtype))
        ids = torch.cat([torch.zeros(context.shape[1], 3, device=z.device), image_ids(h // 2, w // 2, z.device)])
        rope = tr.pos_embed(ids)
        self._bank.text_tokens = context.shape[1]  # what single-stream bank processors split the joined sequence at
        outputs = []
        for i, block in enumerate(tr.transformer_blocks):
            context, hidden = self._run_block(block, hidden, context, temb, rope)
            if stop_after is not None:
                outputs.append(hidden)
                if i == stop_after:
                    return outputs, temb
        for block in tr.single_transformer_blocks:
            context, hidden = self._run_block(block, hidden, context, temb, rope)
        out = tr.proj_out(tr.norm_out(hidden, temb))
        return unpack(out.float(), h, w)

    def _run_block(self, block, hidden, context, temb, rope):
        tr = self.transformer
        if torch.is_grad_enabled() and tr.gradient_checkpointing:  # as the stock forward checkpoints each block
            return tr._gradient_checkpointing_func(block, hidden, context, temb, rope, None)
        return block(hidden_states=hidden, encoder_hidden_states=context, temb=temb, image_rotary_emb=rope)

    def predict(self, z: torch.Tensor, t, cond: Conditioning) -> torch.Tensor:
        """The velocity v (fp32, z's shape) the FLUX pipeline feeds FlowMatchEulerDiscreteScheduler.step."""
        return self.forward(z, t, cond)

    def features(self, z: torch.Tensor, t, cond: Conditioning) -> list[torch.Tensor]:
        """Image-token states after each feature block, (B, C, h/2, w/2) on the token grid, normalised per
        `feature_norm`; differentiable w.r.t. z. The forward stops after the last feature block."""
        blocks = self.feature_block_indices()
        states, temb = self.forward(z, t, cond, stop_after=blocks[-1])
        h, w = z.shape[-2] // 2, z.shape[-1] // 2
        maps = []
        for i in blocks:
            x = states[i]
            if self.feature_norm == "dit":
                x = drop_massive_channels(self._adaln(i, x, temb), x, self.MASSIVE_K)
            maps.append(x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w))
        return maps

    def _adaln(self, block: int, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """x (the output of double-stream block `block`) as the next layer reads it: layer-normed without affine and
        modulated by that layer's AdaLN with temb (the next double block's norm1, else the first single block's
        norm, else norm_out). DiTF-style: AdaLN-normalised DiT features."""
        tr = self.transformer
        if block + 1 < len(tr.transformer_blocks):
            return tr.transformer_blocks[block + 1].norm1(x, emb=temb)[0]
        if len(tr.single_transformer_blocks):
            return tr.single_transformer_blocks[0].norm(x, emb=temb)[0]
        return tr.norm_out(x, temb)

    # ------------------------------------------------------------------------------------ the memory bank

    def bank_layer_names(self) -> list[str]:
        """Names of the attention layers the bank covers (BANK_BLOCKS resolved on this transformer's depth)."""
        span = self.BANK_BLOCKS
        stream = {"double": "transformer_blocks", "single": "single_transformer_blocks"}[span.stream]
        names = [f"{stream}.{i}.attn" for i in span.indices(len(getattr(self.transformer, stream)))]
        if not names:
            raise ValueError(f"transformer: no {span.stream}-stream blocks for the memory bank")
        return names

    @staticmethod
    def image_seq_len(latent_hw: tuple[int, int]) -> int:
        """Image tokens of a latent of this size: FluxPipeline sets the scheduler's dynamic shift from it
        (mu = calculate_shift(image_seq_len, base_image_seq_len, max_image_seq_len, base_shift, max_shift))."""
        return math.ceil(latent_hw[0] / 2) * math.ceil(latent_hw[1] / 2)

    def bank_bytes(self, latent_hw: tuple[int, int], steps: int, images: int = 1) -> int:
        """K and V of the image tokens of every bank layer at every step (the model's dtype)."""
        tokens = self.image_seq_len(latent_hw)
        size = torch.finfo(self.dtype).bits // 8
        per_step = sum(2 * tokens * self.transformer.get_submodule(n).inner_dim * size
                       for n in self.bank_layer_names())
        return per_step * steps * images

    # ------------------------------------------------------------------------------------------- encoders

    @property
    def max_sequence_length(self) -> int:
        """T5 tokens per prompt: the tokenizer's window, at most the pipeline's 512 (FLUX.1-dev: 512)."""
        return min(self.MAX_T5_TOKENS, int(self.tokenizer_2.model_max_length))

    @property
    def max_prompt_tokens(self) -> int:
        return self.max_sequence_length

    @torch.no_grad()
    def condition(self, prompts: Sequence[str], size_hw: tuple[int, int] | None = None) -> Conditioning:
        """As FluxPipeline.encode_prompt: T5's last hidden states (B, max_sequence_length, C) in `text`, CLIP's pooled
        output (77 tokens) in `added["pooled"]`. `size_hw` is not read."""
        prompts = self._check_prompts(prompts)
        clip = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids
        pooled = self.text_encoder(clip.to(self.text_encoder.device)).pooler_output
        t5 = self.tokenizer_2(prompts, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                              return_tensors="pt").input_ids
        text = self.text_encoder_2(t5.to(self.text_encoder_2.device))[0]
        return Conditioning(text=text.float().to(self.device), added={"pooled": pooled.float().to(self.device)})

    def unconditional(self, size_hw: tuple[int, int] | None = None, n: int = 1) -> Conditioning:
        """True CFG's negative branch: the empty prompt, encoded as the pipeline encodes a negative prompt."""
        return self.condition([""] * n, size_hw)

    def prompt_length(self, prompt: str) -> int:
        """T5 tokens of a prompt with its end token (what must fit in max_prompt_tokens; CLIP's pooled embedding
        reads the first 77 tokens, as the pipeline's)."""
        return len(self.tokenizer_2(check_prompt(prompt), truncation=False).input_ids)

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(posterior mean − shift_factor) · scaling_factor, fp32."""
        cfg = self.vae.config
        latent = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist.mean
        return (latent.float() - (cfg.shift_factor or 0.0)) * cfg.scaling_factor

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> np.ndarray:
        """(1, C, h, w) latent -> (H, W, 3) uint8 (inverse of encode_image's scaling, as FluxPipeline decodes)."""
        cfg = self.vae.config
        x = latent.float() / cfg.scaling_factor + (cfg.shift_factor or 0.0)
        x = self.vae.decode(x.to(self.device, self.vae.dtype), return_dict=False)[0]
        if not torch.isfinite(x).all():
            raise NonFiniteError(f"NaN/Inf in the VAE decode ({self.vae.dtype}); try dtype=torch.float32 for the VAE")
        x = (x.float() / 2 + 0.5).clamp(0, 1)
        return (x[0].permute(1, 2, 0).cpu().numpy() * 255.0).round().astype(np.uint8)
