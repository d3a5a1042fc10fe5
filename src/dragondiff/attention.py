"""The memory bank: self-attention keys/values of the source image's tokens, captured during inversion and
injected while sampling.

Which layers own the bank is the backbone's choice (the UNet's decoder self-attention; the image tokens of a
transformer's joint attention); they are touched through attention processors installed for the duration of one
edit and restored afterwards. All state (bank tensors, current step, mode, masks) lives in a `BankController`
owned by that edit; a processor only hands it the image tokens' K/V (`transform`).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# Bank modes while sampling. "union" is the appearance/paste masked union of base background and reference object.
PLAIN, CAPTURE, REPLACE, CONCAT, UNION = "plain", "capture", "replace", "concat", "union"


@dataclass
class MemoryBank:
    """K/V per layer and sampling step: bank[layer][i] = (key, value), each (B, N, C) before the head split.

    Entry i holds what the inversion computed at timestep t_i (input inv[49 − i]), the official off-by-one.
    """

    storage_device: torch.device
    entries: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)

    def store(self, layer: str, step: int, key: torch.Tensor, value: torch.Tensor) -> None:
        dev = self.storage_device
        self.entries.setdefault(layer, {})[step] = (key.detach().to(dev), value.detach().to(dev))

    def get(self, layer: str, step: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.entries[layer][step]
        return k.to(device, non_blocking=True), v.to(device, non_blocking=True)

    def layers(self) -> list[str]:
        return list(self.entries)

    def steps(self, layer: str) -> list[int]:
        return sorted(self.entries[layer])

    @property
    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for d in self.entries.values() for k, _ in d.values())


@dataclass
class BankController:
    """What the decoder self-attention processors do on the next UNet call. Owned by one edit."""

    bank: MemoryBank
    mode: str = PLAIN
    step: int = -1
    # Image-res bool masks for UNION: "base" = region of the base image to take from the reference,
    # "replace" = the object in the reference image.
    union_masks: dict[str, torch.Tensor] = field(default_factory=dict)
    _layer_masks: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)

    @contextmanager
    def use(self, mode: str, step: int = -1):
        previous = (self.mode, self.step)
        self.mode, self.step = mode, step
        try:
            yield
        finally:
            self.mode, self.step = previous

    def _union_mask(self, which: str, tokens: int) -> torch.Tensor:
        """Image-res mask nearest-resized to a layer's token grid, flattened (as the
        official masked union)."""
        key = (which, tokens)
        if key not in self._layer_masks:
            mask = self.union_masks[which]
            height, width = mask.shape
            scale = math.sqrt(height * width / tokens)
            size = (int(height / scale), int(width / scale))
            small = F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0] > 0.5
            self._layer_masks[key] = small.flatten()
        return self._layer_masks[key]

    # Never traced by torch.compile: it looks the bank up by step and writes into it, so a compiled block would
    # recompile at every step; `compile.compile_unet` wraps it in torch.compiler.disable (there, not here: the
    # decorator imports torch._dynamo, 1.5-3 s at every start of the CLI), and it runs eager between the block's
    # two graphs.
    def transform(self, layer: str, key: torch.Tensor, value: torch.Tensor):
        """Return the K/V the generation branch attends to (Q is always its own)."""
        mode = self.mode
        if mode == PLAIN:
            return key, value
        if mode == CAPTURE:
            self.bank.store(layer, self.step, key, value)
            return key, value
        k_bank, v_bank = self.bank.get(layer, self.step, key.device)
        k_bank, v_bank = k_bank.to(key.dtype), v_bank.to(value.dtype)
        batch = key.shape[0]
        if mode == REPLACE:
            return k_bank.expand(batch, -1, -1), v_bank.expand(batch, -1, -1)
        if mode == CONCAT:
            return (
                torch.cat([key, k_bank.expand(batch, -1, -1)], dim=1),
                torch.cat([value, v_bank.expand(batch, -1, -1)], dim=1),
            )
        if mode == UNION:
            keep = ~self._union_mask("base", key.shape[1]).to(key.device)
            take = self._union_mask("replace", key.shape[1]).to(key.device)
            if not (keep.any() or take.any()):
                raise ValueError(f"{layer}: on its {key.shape[1]}-token grid the base mask covers everything and the "
                                 "reference object vanishes; use larger objects or a smaller edit region")
            k = torch.cat([k_bank[0][keep], k_bank[1][take]], dim=0)[None]
            v = torch.cat([v_bank[0][keep], v_bank[1][take]], dim=0)[None]
            return k.expand(batch, -1, -1), v.expand(batch, -1, -1)
        raise ValueError(f"unknown bank mode {mode!r}")


@dataclass
class BankSlot:
    """Where the installed bank processors find the controller of the edit in progress (None: plain attention).
    Owned by one backbone; the processors stay the same objects across edits, only this value changes."""

    controller: BankController | None = None


def tokens_in(attn, hidden_states, temb):
    """The layer input as (B, N, C) tokens after the spatial and group norms (diffusers' attention preamble, shared
    by our processors)."""
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    if hidden_states.ndim == 4:
        b, c, h, w = hidden_states.shape
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    return hidden_states


def tokens_out(attn, hidden_states, residual, shape):
    """The attention output back in the input's shape, with the residual and the output rescale."""
    if len(shape) == 4:
        hidden_states = hidden_states.transpose(-1, -2).reshape(shape)
    if attn.residual_connection:
        hidden_states = hidden_states + residual
    return hidden_states / attn.rescale_output_factor


class BankAttnProcessor:
    """Self-attention with keys/values supplied by the slot's controller. Same math as diffusers' SDPA processor."""

    def __init__(self, slot: BankSlot, layer: str):
        self.slot = slot
        self.layer = layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise RuntimeError(f"{self.layer}: memory-bank processor expects plain self-attention")
        residual, shape = hidden_states, hidden_states.shape
        hidden_states = tokens_in(attn, hidden_states, temb)
        batch = hidden_states.shape[0]

        query = attn.to_q(hidden_states)
        key, value = attn.to_k(hidden_states), attn.to_v(hidden_states)
        if self.slot.controller is not None:
            key, value = self.slot.controller.transform(self.layer, key, value)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.reshape(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.reshape(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        hidden_states = F.scaled_dot_product_attention(query, key, value, scale=attn.scale)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        return tokens_out(attn, hidden_states, residual, shape)


def install_bank_processors(model, slot: BankSlot, names: list[str], processor=None) -> dict | None:
    """Put bank processors reading `slot` on the attention layers `names` (processor names of `model`; every other
    processor, e.g. an image prompt's cross-attention, is kept). `processor(slot, layer)` builds one (default
    `BankAttnProcessor`, plain self-attention). Returns the processors they replaced, or None when this slot's
    processors are installed already (installing is idempotent)."""
    processor = processor or BankAttnProcessor
    current = model.attn_processors
    if all(isinstance(current[n], processor) and current[n].slot is slot for n in names):
        return None
    installed = dict(current)
    for name in names:
        installed[name] = processor(slot, name.removesuffix(".processor"))
    model.set_attn_processor(installed)
    return current


@contextmanager
def bank_processors(model, controller: BankController, names: list[str], processor=None):
    """Bank processors driven by `controller` for the duration of the block; the originals always come back."""
    slot = BankSlot(controller)
    originals = install_bank_processors(model, slot, names, processor)
    try:
        yield
    finally:
        if originals is not None:
            model.set_attn_processor(originals)
