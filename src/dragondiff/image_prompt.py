"""The image prompt: an IP-Adapter's image tokens read by extra key/value projections in every cross-attention layer.

The official demo (DiffEditor) turns the working image into 64 tokens: the CLIP image encoder's penultimate hidden
states, projected by a Resampler, appended after the 77 text tokens. Each cross-attention layer then computes
Attn(Q, K_text, V_text) + ip_scale · Attn(Q, K_ip, V_ip), the second term only at sampling steps 10..19; a context of
77 tokens or fewer is plain text attention (inversion, feature passes and time travel never see image tokens).

Files read (the variant comes from the keys, the token count from the weights):
  - DiffEditor's `ip_sd15_64.bin`: {"image_proj": Resampler (64 queries), "ip_adapter": to_k_ip/to_v_ip of the 16
    cross-attention layers, keys 1, 3, ..., 31};
  - IP-Adapter's `ip-adapter-plus_sd15` (the same Resampler, 16 tokens, penultimate hidden states) and
    `ip-adapter_sd15` (a linear projection of the pooled `image_embeds` to 4 tokens);
  - as `.bin` (a tensor pickle: loaded with torch's weights-only unpickler, which refuses code) or as one flat
    `.safetensors` with `image_proj.` / `ip_adapter.` prefixes (`dragondiff convert-ip-adapter` writes it).

The projection modules are diffusers' (`ImageProjection`, `IPAdapterPlusImageProjection`); the attention processor
is ours, because the official gating (step window, ≤77 guard, which tokens count as image tokens) is data in a slot
the processors read, like the memory bank's, so changing the scale or the window never rebuilds processors.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .attention import tokens_in, tokens_out
from .backbone import is_cross_attention

PROMPT_SIZE = 256  # the official pre-resize of an image prompt, before the CLIP image processor
VARIANTS = {
    "resampler": "Resampler (DiffEditor's ip_sd15_64, IP-Adapter Plus): penultimate CLIP hidden states",
    "linear": "linear projection (IP-Adapter): pooled CLIP image embeddings",
}
_LAYER_KEY = re.compile(r"^(\d+)\.(to_k_ip|to_v_ip)\.weight$")


@dataclass
class ImagePromptSlot:
    """What the installed image-prompt processors do on the next UNet call: the weight of the image term (0: none)
    and how many trailing context tokens are image-prompt tokens (0: the whole context is text)."""

    scale: float = 0.0
    ip_tokens: int = 0


class ImagePromptAttnProcessor:
    """Cross-attention with an image-prompt term. Same math as diffusers' SDPA processor for the text part."""

    def __init__(self, slot: ImagePromptSlot, layer: str, to_k_ip: torch.nn.Linear, to_v_ip: torch.nn.Linear):
        self.slot, self.layer = slot, layer
        self.to_k_ip, self.to_v_ip = to_k_ip, to_v_ip

    def _attend(self, attn, query, key, value, batch):
        head_dim = key.shape[-1] // attn.heads
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = F.scaled_dot_product_attention(query, key, value, scale=attn.scale)
        return out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is None or attention_mask is not None:
            raise RuntimeError(f"{self.layer}: the image-prompt processor expects plain cross-attention")
        residual, shape = hidden_states, hidden_states.shape
        hidden_states = tokens_in(attn, hidden_states, temb)
        batch = hidden_states.shape[0]
        n_ip = self.slot.ip_tokens
        text, image = (encoder_hidden_states[:, :-n_ip], encoder_hidden_states[:, -n_ip:]) if n_ip else \
            (encoder_hidden_states, None)
        if attn.norm_cross:
            text = attn.norm_encoder_hidden_states(text)

        query = attn.to_q(hidden_states)
        head_dim = query.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        hidden_states = self._attend(attn, query, attn.to_k(text), attn.to_v(text), batch)
        if image is not None and self.slot.scale != 0:
            image = image.to(self.to_k_ip.weight.dtype)
            ip = self._attend(attn, query, self.to_k_ip(image), self.to_v_ip(image), batch)
            hidden_states = hidden_states + self.slot.scale * ip.to(hidden_states.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        return tokens_out(attn, hidden_states, residual, shape)


# ------------------------------------------------------------------------------------------------ files

def read_adapter_file(path: str | Path, *, allow_pickle: bool = True) -> tuple[dict, dict]:
    """(image_proj state, ip_adapter state) of an adapter file, `.bin`/`.pt` (a tensor pickle, read by torch's
    weights-only unpickler) or `.safetensors` (flat keys with `image_proj.` / `ip_adapter.` prefixes)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ip_adapter: file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            flat = load_file(str(path))
        except Exception as e:  # noqa: BLE001 (safetensors raises its own error types)
            raise ValueError(f"ip_adapter: cannot read {path.name} as safetensors ({e})") from e
        proj = {k.removeprefix("image_proj."): v for k, v in flat.items() if k.startswith("image_proj.")}
        layers = {k.removeprefix("ip_adapter."): v for k, v in flat.items() if k.startswith("ip_adapter.")}
        other = sorted(k for k in flat if not k.startswith(("image_proj.", "ip_adapter.")))
        if other:
            raise ValueError(f"ip_adapter: {path.name} has keys outside image_proj./ip_adapter. (e.g. {other[0]!r}); "
                             "not an IP-Adapter file")
        return proj, layers
    if path.suffix not in (".bin", ".pt", ".pth"):
        raise ValueError(f"ip_adapter: expected a .bin or .safetensors file, got {path.name}")
    if not allow_pickle:
        raise ValueError(f"ip_adapter: {path.name} is a pickle; convert it with `dragondiff convert-ip-adapter` or "
                         "allow pickles")
    import pickle

    if path.stat().st_size == 0:
        raise ValueError(f"ip_adapter: {path.name} is empty (0 bytes)")
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # something other than tensors: code, or objects that could hide code
        raise ValueError(f"ip_adapter: {path.name} is not a plain tensor file; refused without running it, as "
                         f"loading it fully could execute code in it (torch: {unpickling_reason(e)})") from e
    except Exception as e:  # noqa: BLE001 (a truncated or foreign file fails anywhere in torch's reader)
        raise ValueError(f"ip_adapter: cannot read {path.name} as a tensor file ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:300] if str(e) else 'no detail'})") from e
    if not isinstance(data, dict) or set(data) != {"image_proj", "ip_adapter"}:
        found = sorted(map(str, data))[:5] if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"ip_adapter: {path.name} must hold {{'image_proj': ..., 'ip_adapter': ...}}; found {found}")
    for part in ("image_proj", "ip_adapter"):
        if not isinstance(data[part], dict):
            raise ValueError(f"ip_adapter: {path.name}'s {part} is a {type(data[part]).__name__}; expected a dict "
                             "of tensors")
    return dict(data["image_proj"]), dict(data["ip_adapter"])


def unpickling_reason(error: Exception) -> str:
    """Why torch's weights-only unpickler refused a file (the line naming the global or type), without its
    boilerplate about re-running with weights_only=False."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reasons = [line for line in lines if not line.startswith(("Weights only load failed", "Check the documentation",
                                                              "(1)", "(2)", "In PyTorch"))]
    text = " ".join(reasons)
    text = text.split("WeightsUnpickler error:", 1)[-1].strip()  # after torch's "please file an issue" request
    return text[:500] or (lines[0][:500] if lines else type(error).__name__)


def check_tensors(proj: dict, layers: dict) -> None:
    """Every entry of the adapter's two parts a tensor with no empty dimension, named by its file key."""
    for prefix, state in (("image_proj", proj), ("ip_adapter", layers)):
        for key, value in state.items():
            if not isinstance(key, str) or not isinstance(value, torch.Tensor):
                raise ValueError(f"ip_adapter: {prefix}.{key} is a {type(value).__name__}; expected a tensor")
            if value.dim() == 0 or 0 in value.shape:
                raise ValueError(f"ip_adapter: {prefix}.{key} has shape {tuple(value.shape)}; expected a tensor "
                                 "with no empty dimension")


# The dimensions of the projection tensors the variant's sizes are read from.
VARIANT_DIMS = {"resampler": {"latents": 3, "proj_in.weight": 2, "proj_out.weight": 2, "norm_out.weight": 1,
                              "layers.0.0.to_q.weight": 2, "layers.0.1.1.weight": 2},
                "linear": {"proj.weight": 2, "proj.bias": 1, "norm.weight": 1, "norm.bias": 1}}


def check_dims(proj: dict, variant: str) -> None:
    for key, dims in VARIANT_DIMS[variant].items():
        if key not in proj:
            raise ValueError(f"ip_adapter: image_proj.{key} is missing; the {variant} image projection needs it")
        if proj[key].dim() != dims:
            raise ValueError(f"ip_adapter: image_proj.{key} has shape {tuple(proj[key].shape)}; expected {dims} "
                             "dimensions")


def convert_to_safetensors(source: str | Path, target: str | Path) -> Path:
    """Write an adapter `.bin` as one flat `.safetensors` (no pickle needed to read it again)."""
    from safetensors.torch import save_file

    proj, layers = read_adapter_file(source)
    flat = {f"image_proj.{k}": v.contiguous() for k, v in proj.items()}
    flat.update({f"ip_adapter.{k}": v.contiguous() for k, v in layers.items()})
    target = Path(target)
    save_file(flat, str(target))
    return target


def detect_variant(proj: dict) -> tuple[str, int]:
    """(variant, tokens) from the image projection's keys and shapes; a clear refusal otherwise."""
    check_tensors(proj, {})
    if {"latents", "proj_in.weight", "proj_out.weight", "norm_out.weight"} <= set(proj):
        check_dims(proj, "resampler")
        latents = proj["latents"]
        if latents.dim() != 3 or latents.shape[0] != 1:
            raise ValueError(f"ip_adapter: image_proj.latents has shape {tuple(latents.shape)}; expected (1, N, C)")
        return "resampler", int(latents.shape[1])
    if {"proj.weight", "proj.bias", "norm.weight", "norm.bias"} <= set(proj):
        check_dims(proj, "linear")
        out_dim, norm_dim = proj["proj.weight"].shape[0], proj["norm.weight"].shape[0]
        if out_dim % norm_dim:
            raise ValueError(f"ip_adapter: image_proj.proj.weight has {out_dim} outputs, not a multiple of the "
                             f"token width {norm_dim}")
        return "linear", out_dim // norm_dim
    keys = sorted(proj)[:6]
    raise ValueError(f"ip_adapter: unknown image projection (keys {keys}); supported: "
                     + "; ".join(VARIANTS.values()))


def build_projection(proj: dict, variant: str, context_dim: int) -> torch.nn.Module:
    """diffusers' module for the variant, with the file's weights (strict: every key and shape must match)."""
    from diffusers.models.embeddings import ImageProjection, IPAdapterPlusImageProjection

    if variant == "linear":
        width = proj["norm.weight"].shape[0]
        module = ImageProjection(cross_attention_dim=width, image_embed_dim=proj["proj.weight"].shape[1],
                                 num_image_text_embeds=proj["proj.weight"].shape[0] // width)
        state = {k.replace("proj", "image_embeds", 1) if k.startswith("proj") else k: v for k, v in proj.items()}
        names = {k: f"proj{k.removeprefix('image_embeds')}" if k.startswith("image_embeds") else k for k in state}
    else:
        depths = {m.group(1) for m in map(re.compile(r"^layers\.(\d+)\.").match, proj) if m}
        latents, to_q = proj["latents"], proj["layers.0.0.to_q.weight"]
        if to_q.shape[0] % 64:
            raise ValueError(f"ip_adapter: image_proj.layers.0.0.to_q.weight has {to_q.shape[0]} rows; expected a "
                             "multiple of 64 (attention heads of 64)")
        module = IPAdapterPlusImageProjection(embed_dims=proj["proj_in.weight"].shape[1],
                                              output_dims=proj["proj_out.weight"].shape[0],
                                              hidden_dims=latents.shape[2], depth=1 + max(map(int, depths)),
                                              dim_head=64, heads=to_q.shape[0] // 64, num_queries=latents.shape[1],
                                              ffn_ratio=proj["layers.0.1.1.weight"].shape[0] / latents.shape[2])
        state, names = _resampler_state(proj)
    check_state(module, state, names, variant)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:  # check_state names what it can; torch's whole message otherwise, not its first line
        raise ValueError(f"ip_adapter: the {variant} image projection does not load ("
                         + " ".join(line.strip() for line in str(e).splitlines())[:800] + ")") from e
    width = proj["norm.weight" if variant == "linear" else "norm_out.weight"].shape[0]
    if width != context_dim:
        raise ValueError(f"ip_adapter: its tokens are {width} wide; this UNet's cross-attention reads {context_dim}")
    return module.eval().requires_grad_(False)


def check_state(module: torch.nn.Module, state: dict, names: dict, variant: str) -> None:
    """The file's projection weights against the module built from its sizes, each problem named by its file key
    (`names`: module key -> file key): missing, unexpected, or of another shape."""
    expected = module.state_dict()
    unexpected = [names.get(k, k) for k in state if k not in expected]
    missing = list(dict.fromkeys(_file_key(k) for k in expected if k not in state))
    shapes = [f"{names.get(k, k)} is {tuple(v.shape)}, expected {tuple(expected[k].shape)}"
              for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    problems = [f"{what} image_proj keys: {', '.join(keys[:5])}" + (f" ({len(keys)} in all)" if len(keys) > 5 else "")
                for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
    problems += [f"image_proj.{shape}" for shape in shapes[:5]]
    if problems:
        raise ValueError(f"ip_adapter: the {variant} image projection does not load: " + "; ".join(problems))


# diffusers' IPAdapterPlusImageProjection names -> IP-Adapter's Resampler file names (the inverse of
# _resampler_state, to name a missing weight as the file would hold it).
_FILE_NAMES = (("ln0.", "0.norm1."), ("ln1.", "0.norm2."), ("attn.to_k.", "0.to_kv."), ("attn.to_v.", "0.to_kv."),
               ("attn.to_out.0.", "0.to_out."), ("attn.", "0."), ("ff.0.", "1.0."), ("ff.1.net.0.proj.", "1.1."),
               ("ff.1.net.2.", "1.3."), ("image_embeds.", "proj."))


def _file_key(key: str) -> str:
    m = re.match(r"^(layers\.\d+\.)(.+)$", key)
    head, rest = (m.group(1), m.group(2)) if m else ("", key)
    for ours, theirs in _FILE_NAMES:
        if rest.startswith(ours):
            return head + theirs + rest[len(ours):]
    return key


def _resampler_state(proj: dict) -> tuple[dict, dict]:
    """IP-Adapter's Resampler keys as diffusers' IPAdapterPlusImageProjection names them (to_kv split in two), and
    {diffusers key: file key} to name a problem by the file's key."""
    out, names = {}, {}
    for key, value in proj.items():
        m = re.match(r"^layers\.(\d+)\.(0|1)\.(.+)$", key)
        if m is None:
            out[key], names[key] = value, key
            continue
        before = set(out)
        i, part, rest = m.groups()
        if part == "0":  # the Perceiver attention
            if rest.startswith("norm1."):
                out[f"layers.{i}.ln0.{rest[6:]}"] = value
            elif rest.startswith("norm2."):
                out[f"layers.{i}.ln1.{rest[6:]}"] = value
            elif rest == "to_kv.weight":
                k, v = value.chunk(2, dim=0)
                out[f"layers.{i}.attn.to_k.weight"], out[f"layers.{i}.attn.to_v.weight"] = k, v
            elif rest == "to_out.weight":
                out[f"layers.{i}.attn.to_out.0.weight"] = value
            else:
                out[f"layers.{i}.attn.{rest}"] = value
        else:  # the feed-forward: LayerNorm, Linear, GELU, Linear
            sub, tail = rest.split(".", 1)
            name = {"0": "ff.0", "1": "ff.1.net.0.proj", "3": "ff.1.net.2"}.get(sub)
            if name is None:
                raise ValueError(f"ip_adapter: unexpected key image_proj.{key}")
            out[f"layers.{i}.{name}.{tail}"] = value
        names.update({k: key for k in set(out) - before})
    return out, names


def cross_attention_names(unet) -> list[str]:
    """The UNet's processor names in diffusers' order (down, up, mid), as the files index them."""
    return list(unet.attn_processors)


def build_layers(unet, layers: dict) -> dict[str, tuple[torch.nn.Linear, torch.nn.Linear]]:
    """to_k_ip / to_v_ip per cross-attention processor name. The file indexes layers by their position in the
    UNet's processor list; every cross-attention layer must get both projections, of its own width."""
    check_tensors({}, layers)
    names = cross_attention_names(unet)
    found: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in layers.items():
        m = _LAYER_KEY.match(key)
        if m is None:
            raise ValueError(f"ip_adapter: unexpected key {key!r} (expected '<n>.to_k_ip.weight' / '<n>.to_v_ip.weight')")
        found.setdefault(int(m.group(1)), {})[m.group(2)] = value
    cross = [k for k, n in enumerate(names) if is_cross_attention(n)]
    extra = sorted(set(found) - set(cross))
    if extra:
        keys = [f"{k}.{which}.weight" for k in extra for which in sorted(found[k])]
        raise ValueError(f"ip_adapter: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}: no cross-attention "
                         f"layer {extra[0]} in this UNet (its {len(cross)} are {cross[:4]}...); an adapter for another "
                         "model?")
    if sorted(found) != cross:
        absent = [k for k in cross if k not in found]
        raise ValueError(f"ip_adapter: no weights for cross-attention layer{'s' * (len(absent) > 1)} "
                         f"{', '.join(map(str, absent[:8]))}{' ...' if len(absent) > 8 else ''} of this UNet's "
                         f"{len(cross)} (e.g. {absent[0]}.to_k_ip.weight); an adapter for another model?")
    out = {}
    for k in cross:
        name = names[k]
        module = unet.get_submodule(name.removesuffix(".processor"))
        pair = found[k]
        if set(pair) != {"to_k_ip", "to_v_ip"}:
            raise ValueError(f"ip_adapter: layer {k} has {sorted(pair)}; expected to_k_ip and to_v_ip")
        linears = []
        for which in ("to_k_ip", "to_v_ip"):
            w = pair[which]
            expected = (module.to_k.out_features, module.to_k.in_features)
            if tuple(w.shape) != expected:
                raise ValueError(f"ip_adapter: {k}.{which}.weight has shape {tuple(w.shape)}; layer {name} needs "
                                 f"{expected}")
            lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
            lin.weight.data.copy_(w)
            linears.append(lin.eval().requires_grad_(False))
        out[name] = (linears[0], linears[1])
    return out


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _processor_class():
    """CLIP's image processor; its PIL implementation where transformers has one (the default one wants
    torchvision, which this package does not need, and says so on every load)."""
    import transformers

    return getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor


ENCODER_TYPES = ("clip_vision_model", "clip")  # a CLIP vision folder, or a whole CLIP model (its vision tower)


def check_encoder_folder(folder: Path) -> None:
    """Refuse, naming what it is, a folder that is not a CLIP image encoder (a text encoder, a diffusers UNet...)
    before transformers reads it as one (it would load with every weight missing, filled at random)."""
    import json

    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"image_encoder: {folder} has no readable config.json ({e}); expected a "
                         "CLIPVisionModelWithProjection folder") from e
    if not isinstance(config, dict):
        raise ValueError(f"image_encoder: {folder}/config.json is not an object")
    kind = config.get("model_type")
    if kind in ENCODER_TYPES:
        return
    what = (f"a diffusers {config['_class_name']} folder" if config.get("_class_name")
            else "a CLIP text model" if kind == "clip_text_model"
            else f"a {kind} model" if kind else "not a transformers model")
    raise ValueError(f"image_encoder: {folder} is {what}, not a CLIP image encoder (model_type "
                     f"{' or '.join(ENCODER_TYPES)}; e.g. h94/IP-Adapter's models/image_encoder)")


def load_image_encoder(source: str | Path | None, *, local_files_only: bool = False):
    """(CLIPVisionModelWithProjection, CLIPImageProcessor) from a folder or hub id (the processor's settings from
    the folder when it has them, else CLIP's defaults: shortest side 224, centre crop 224)."""
    from transformers import CLIPVisionModelWithProjection

    CLIPImageProcessor = _processor_class()
    if source is None:
        raise ValueError("image_encoder: an image prompt needs a CLIP image encoder (a CLIPVisionModelWithProjection "
                         "folder or hub id, e.g. h94/IP-Adapter's models/image_encoder)")
    source = str(source)
    if (source.startswith((".", "/", "~")) or source.count("/") != 1) and not Path(source).is_dir():
        raise FileNotFoundError(f"image_encoder: {source} is not a folder (a CLIPVisionModelWithProjection folder "
                                "or a hub id 'owner/name')")
    if Path(source).is_dir():
        check_encoder_folder(Path(source))
    from .weights import check_loading_info

    try:
        encoder, info = CLIPVisionModelWithProjection.from_pretrained(source, local_files_only=local_files_only,
                                                                      output_loading_info=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"image_encoder: cannot load a CLIP image encoder from {source!r} ({str(e)[:600]})") from e
    check_loading_info(encoder, info, f"image_encoder: {source}")
    try:
        processor = CLIPImageProcessor.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError):
        processor = CLIPImageProcessor()
    return encoder.eval().requires_grad_(False), processor


@dataclass
class ImagePrompt:
    """A loaded adapter: its image projection, its per-layer K/V projections, the image encoder, and where they
    came from (for sidecars and `info`)."""

    variant: str
    tokens: int
    projection: torch.nn.Module
    layers: dict[str, tuple[torch.nn.Linear, torch.nn.Linear]]
    encoder: torch.nn.Module
    processor: object
    path: str | None = None
    sha256: str | None = None
    encoder_source: str | None = None
    encoder_sha256: str | None = None  # of the encoder folder's weight and config files (a local folder only)
    slot: ImagePromptSlot = field(default_factory=ImagePromptSlot)

    @property
    def modules(self) -> list[torch.nn.Module]:
        return [self.projection, self.encoder] + [m for pair in self.layers.values() for m in pair]

    def to(self, device, dtype) -> None:
        for module in self.modules:
            module.to(device=device, dtype=dtype)

    def record(self) -> dict:
        return {"file": self.path, "sha256": self.sha256, "variant": self.variant, "tokens": self.tokens,
                "image_encoder": self.encoder_source, "image_encoder_sha256": self.encoder_sha256}

    @torch.no_grad()
    def embed(self, images: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, unconditional tokens), each (1, len(images)·N, C): every image pre-resized to 256² (PIL bicubic)
        then through the CLIP image processor; the unconditional tokens come from all-zero pixels after
        normalisation (Resampler variants, as the official demo) or all-zero embeddings (the linear variant, as
        IP-Adapter)."""
        from PIL import Image

        device, dtype = next(self.encoder.parameters()).device, next(self.encoder.parameters()).dtype
        conds, unconds = [], []
        for image in images:
            small = Image.fromarray(np.asarray(image)).resize((PROMPT_SIZE, PROMPT_SIZE), Image.BICUBIC)
            pixels = self.processor(images=small, return_tensors="pt").pixel_values.to(device, dtype)
            if self.variant == "resampler":
                feats = self.encoder(pixels, output_hidden_states=True).hidden_states[-2]
                zero = self.encoder(torch.zeros_like(pixels), output_hidden_states=True).hidden_states[-2]
            else:
                feats = self.encoder(pixels).image_embeds
                zero = torch.zeros_like(feats)
            proj_dtype = next(self.projection.parameters()).dtype
            conds.append(self.projection(feats.to(proj_dtype)))
            unconds.append(self.projection(zero.to(proj_dtype)))
        return torch.cat(conds, dim=1).float(), torch.cat(unconds, dim=1).float()


def load(unet, path: str | Path, image_encoder, *, allow_pickle: bool = True,
         local_files_only: bool = False) -> ImagePrompt:
    """Read and check an adapter file for this UNet, and its image encoder (a folder, hub id, or a loaded
    `(CLIPVisionModelWithProjection, CLIPImageProcessor)` pair or model)."""
    proj, layer_state = read_adapter_file(path, allow_pickle=allow_pickle)
    prompt = from_state(unet, proj, layer_state, image_encoder, local_files_only=local_files_only)
    prompt.path, prompt.sha256 = str(Path(path).resolve()), file_sha256(Path(path))
    return prompt


def from_state(unet, proj: dict, layer_state: dict, image_encoder, *, local_files_only: bool = False) -> ImagePrompt:
    """An ImagePrompt from an adapter's two state dicts (as the files hold them) and its image encoder."""
    variant, tokens = detect_variant(proj)
    projection = build_projection(proj, variant, unet.config.cross_attention_dim)
    layers = build_layers(unet, layer_state)
    if isinstance(image_encoder, (str, Path)) or image_encoder is None:
        encoder, processor = load_image_encoder(image_encoder, local_files_only=local_files_only)
        source = None if image_encoder is None else str(image_encoder)
    else:
        encoder, processor = image_encoder if isinstance(image_encoder, tuple) and len(image_encoder) == 2 else (
            image_encoder, _processor_class()())
        config = getattr(encoder, "config", None)
        if not isinstance(encoder, torch.nn.Module) or getattr(config, "model_type", None) not in ENCODER_TYPES:
            raise TypeError("image_encoder: expected a CLIPVisionModelWithProjection folder or hub id, the model, "
                            f"or a (model, processor) pair; got {type(encoder).__name__}")
        source = getattr(encoder, "name_or_path", None) or "<in-memory>"
    expected = proj["proj_in.weight"].shape[1] if variant == "resampler" else proj["proj.weight"].shape[1]
    got = encoder.config.hidden_size if variant == "resampler" else encoder.config.projection_dim
    if got != expected:
        what = "hidden size" if variant == "resampler" else "projection size"
        raise ValueError(f"image_encoder: its {what} is {got}; this adapter's projection reads {expected}")
    return ImagePrompt(variant=variant, tokens=tokens, projection=projection, layers=layers, encoder=encoder,
                       processor=processor, encoder_source=source, encoder_sha256=encoder_fingerprint(image_encoder))


def encoder_fingerprint(image_encoder) -> str | None:
    """sha256 of an image encoder given as a local folder (as `provenance.folder_hash` fingerprints a model
    folder), so that a sidecar re-run can tell its weights changed; None for a hub id or an in-memory model."""
    if not isinstance(image_encoder, (str, Path)) or not Path(image_encoder).is_dir():
        return None
    from .weights import folder_hash

    return folder_hash(Path(image_encoder))


def random_state(unet, variant: str = "resampler", tokens: int = 64, *, encoder_width: int, hidden: int = 768,
                 heads: int = 12, depth: int = 4, seed: int = 0) -> tuple[dict, dict]:
    """Random adapter weights for this UNet in the files' key layout (image_proj, ip_adapter): for tests of the file
    formats and for timing the image prompt without the released weights. The defaults are the official
    Resampler's sizes (hidden 768, 12 heads of 64, depth 4, feed-forward x4)."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g) * 0.02  # noqa: E731
    width = unet.config.cross_attention_dim
    if variant == "linear":
        proj = {"proj.weight": rnd(tokens * width, encoder_width), "proj.bias": rnd(tokens * width),
                "norm.weight": 1 + rnd(width), "norm.bias": rnd(width)}
    else:
        inner, ff = heads * 64, 4 * hidden
        proj = {"latents": rnd(1, tokens, hidden) * 50, "proj_in.weight": rnd(hidden, encoder_width),
                "proj_in.bias": rnd(hidden), "proj_out.weight": rnd(width, hidden), "proj_out.bias": rnd(width),
                "norm_out.weight": 1 + rnd(width), "norm_out.bias": rnd(width)}
        for i in range(depth):
            proj.update({f"layers.{i}.0.norm1.weight": 1 + rnd(hidden), f"layers.{i}.0.norm1.bias": rnd(hidden),
                         f"layers.{i}.0.norm2.weight": 1 + rnd(hidden), f"layers.{i}.0.norm2.bias": rnd(hidden),
                         f"layers.{i}.0.to_q.weight": rnd(inner, hidden),
                         f"layers.{i}.0.to_kv.weight": rnd(2 * inner, hidden),
                         f"layers.{i}.0.to_out.weight": rnd(hidden, inner), f"layers.{i}.1.0.weight": 1 + rnd(hidden),
                         f"layers.{i}.1.0.bias": rnd(hidden), f"layers.{i}.1.1.weight": rnd(ff, hidden),
                         f"layers.{i}.1.3.weight": rnd(hidden, ff)})
    layers = {}
    for k, name in enumerate(unet.attn_processors):
        if is_cross_attention(name):
            module = unet.get_submodule(name.removesuffix(".processor"))
            for which in ("to_k_ip", "to_v_ip"):
                layers[f"{k}.{which}.weight"] = rnd(module.to_k.out_features, module.to_k.in_features) * 5
    return proj, layers
