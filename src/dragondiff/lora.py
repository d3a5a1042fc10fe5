"""LoRAs on a backbone's UNet and text encoder(s), through diffusers' LoRA loaders and peft.

diffusers reads the file's layout (its own, peft's, or kohya's as civitai files have it: `lora_unet_...`,
`lora_te_...` with `.alpha`), converts it to its own names (`lora_state_dict`), and peft wraps the targeted Linear
and Conv layers (`to_q`, `to_k`, ...) with LoRA layers that add `scale * B(A(x))` to the base layer's output. The
memory bank's and the image prompt's attention processors call `attn.to_q(...)` etc., so they run through the LoRA
layers unchanged. Fusing adds the weighted deltas into the base weights (peft's wrappers then call only the base
layer: no LoRA matmuls, a Python call per layer left; a permanent fuse removes the wrappers too); unfusing
subtracts them, exact only to rounding. Before anything is added, every key is checked against the
loaded model: a file for another family, or with missing or misshaped layers, is refused by name.

`LoraSet` is what `DragonPipeline.load_lora_weights` and its siblings use: one per pipeline.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .loading import PICKLE_SUFFIXES

# The file names diffusers' `save_lora_weights` writes, looked for in a folder.
FOLDER_FILES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")
SCALE_RANGE = (-10.0, 10.0)  # weights beyond these are typos, not styles
SHOWN_KEYS = 3  # keys a refusal names


@dataclass
class Lora:
    """One loaded LoRA: its peft adapter name, where it came from, its weight."""

    name: str
    path: Path | None  # None: it came with a diffusers pipeline (`from_pipe`)
    sha256: str | None
    scale: float

    def record(self, fused: bool) -> dict:
        """What a sidecar keeps of it."""
        return {"file": None if self.path is None else self.path.name, "path": None if self.path is None else
                str(self.path), "sha256": self.sha256, "scale": self.scale, "adapter_name": self.name,
                "fused": fused}


def check_scale(value, name: str) -> float:
    """A LoRA weight: a finite number in SCALE_RANGE."""
    from .validate import check_number

    return check_number(value, name, *SCALE_RANGE)


def lora_file(path, *, allow_pickle: bool = False) -> Path:
    """The weights file of a LoRA given as a file or a folder (diffusers' FOLDER_FILES, or its one weights file);
    a pickle only with allow_pickle=True."""
    path = Path(path).expanduser()
    if path.is_dir():
        found = [path / f for f in FOLDER_FILES if (path / f).is_file()]
        if not found:
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in (".safetensors",) + PICKLE_SUFFIXES)
        if len(found) != 1 and not (found and found[0].name in FOLDER_FILES):
            raise ValueError(f"lora: {path} holds {'no' if not found else len(found)} LoRA weights files "
                             f"(expected {FOLDER_FILES[0]} or one .safetensors file)")
        path = found[0]
    if not path.is_file():
        raise ValueError(f"lora: {path}: no such file or folder")
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise ValueError(f"lora: {path.name} is a pickle, which can run arbitrary code when loaded; convert it to "
                         ".safetensors or pass allow_pickle=True if you trust it")
    if suffix not in PICKLE_SUFFIXES + (".safetensors",):
        raise ValueError(f"lora: expected a .safetensors (or, with allow_pickle, .bin/.pt/.ckpt) file, got {path.name}")
    return path


def read_file(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a LoRA file (a pickle through torch's weights-only unpickler)."""
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same refusal
        raise ValueError(f"lora: cannot read {path.name} as LoRA weights: {type(e).__name__}: {e}") from e
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"lora: {path.name} holds no tensors (an empty or non-LoRA file)")
    return state


def _mixin(backbone):
    from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin

    return StableDiffusionXLLoraLoaderMixin if getattr(backbone, "text_encoder_2", None) is not None \
        else StableDiffusionLoraLoaderMixin


def parts(backbone) -> dict[str, torch.nn.Module]:
    """The modules a LoRA may target, by the prefix diffusers gives their keys."""
    out = {"unet": backbone.denoiser, "text_encoder": backbone.text_encoder}
    if getattr(backbone, "text_encoder_2", None) is not None:
        out["text_encoder_2"] = backbone.text_encoder_2
    return out


def convert(state: dict, backbone, name: str) -> tuple[dict, dict | None]:
    """(state dict in diffusers' names, network alphas) of a file's tensors in any layout diffusers reads."""
    if not all("lora" in k or k.endswith(".alpha") for k in state):
        odd = [k for k in state if "lora" not in k and not k.endswith(".alpha")][:SHOWN_KEYS]
        raise ValueError(f"lora: {name} is not a LoRA (keys without 'lora': {odd})")
    try:
        out, alphas = _mixin(backbone).lora_state_dict(dict(state), unet_config=backbone.denoiser.config)
    except Exception as e:  # noqa: BLE001 - diffusers' converters raise many kinds on foreign layouts
        raise ValueError(f"lora: {name}: diffusers cannot read its layout ({type(e).__name__}: {e}); first keys: "
                         f"{list(state)[:SHOWN_KEYS]}") from e
    return out, alphas


def peft_keys(state: dict, prefix: str, model, name: str) -> dict[str, torch.Tensor]:
    """The keys of `prefix` in peft's names (`<module>.lora_A.weight` ...), as diffusers converts them on load
    (a layout its converters cannot place is refused: loading it would fail the same way)."""
    try:
        return _peft_keys(state, prefix, model)
    except ValueError as e:
        raise ValueError(f"lora: {name}: diffusers cannot convert its {prefix} layers ({e}); first keys: "
                         f"{[k for k in state if k.startswith(prefix + '.')][:SHOWN_KEYS]}") from e


def _peft_keys(state: dict, prefix: str, model) -> dict[str, torch.Tensor]:
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, \
        convert_unet_state_dict_to_peft

    own = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
    if not own:
        return {}
    if prefix == "unet":
        return own if any("lora_A" in k for k in own) else convert_unet_state_dict_to_peft(own)
    own = convert_state_dict_to_peft(convert_state_dict_to_diffusers(own))
    if not hasattr(model, "text_model"):  # recent transformers flatten CLIPTextModel
        own = {k.removeprefix("text_model."): v for k, v in own.items()}
    return own


_PEFT_KEY = re.compile(r"^(.+)\.(lora_A|lora_B)\.weight$")


def check_fits(state: dict, backbone, name: str) -> list[str]:
    """Refuse (ValueError naming the file and the first bad keys) a LoRA whose keys are not layers of this model
    with these shapes; the parts it changes otherwise."""
    models = parts(backbone)
    foreign = [k for k in state if k.split(".", 1)[0] not in models]
    if foreign:
        raise ValueError(f"lora: {name} has layers this {backbone.NAME} model does not have (not of its "
                         f"{', '.join(models)}): {foreign[:SHOWN_KEYS]}; is it for another model family?")
    touched = []
    for prefix, model in models.items():
        own = peft_keys(state, prefix, model, name)
        if not own:
            continue
        touched.append(prefix)
        bad, ranks = [], {}
        for key, tensor in own.items():
            match = _PEFT_KEY.match(key)
            if match is None:
                if not key.endswith((".lora_B.bias", ".alpha")):
                    bad.append(f"{prefix}.{key} (not a LoRA A/B weight)")
                continue
            module_name, which = match.groups()
            problem = _layer_problem(model, module_name, which, tensor)
            if problem:
                bad.append(f"{prefix}.{key} ({problem})")
            ranks.setdefault(module_name, {})[which] = tensor.shape[0] if which == "lora_A" else tensor.shape[1]
        bad += [f"{prefix}.{m} (has only {sorted(r)})" for m, r in ranks.items() if len(r) != 2]
        bad += [f"{prefix}.{m} (ranks differ: {r})" for m, r in ranks.items() if len(set(r.values())) > 1]
        if bad:
            raise ValueError(f"lora: {name} does not fit this {backbone.NAME} model: {bad[:SHOWN_KEYS]}"
                             + (f" and {len(bad) - SHOWN_KEYS} more" if len(bad) > SHOWN_KEYS else "")
                             + "; is it for another model family?")
    return touched


def _layer_problem(model, module_name: str, which: str, tensor: torch.Tensor) -> str | None:
    try:
        layer = model.get_submodule(module_name)
    except AttributeError:
        return "no such layer"
    layer = getattr(layer, "base_layer", layer)  # already wrapped by another LoRA
    if isinstance(layer, torch.nn.Linear):
        fan_in, fan_out, dims = layer.in_features, layer.out_features, 2
    elif isinstance(layer, torch.nn.Conv2d):
        fan_in, fan_out, dims = layer.in_channels, layer.out_channels, 4
    else:
        return f"a {type(layer).__name__}, which LoRA does not target"
    if tensor.dim() != dims:
        return f"shape {tuple(tensor.shape)} for a {type(layer).__name__}"
    expected = fan_in if which == "lora_A" else fan_out
    got = tensor.shape[1] if which == "lora_A" else tensor.shape[0]
    if got != expected or not torch.isfinite(tensor).all():
        return f"shape {tuple(tensor.shape)} for a layer {fan_in} -> {fan_out}" if got != expected \
            else "non-finite values"
    return None


def read_fitting(source, backbone, allow_pickle: bool = False) -> tuple[Path, dict, dict | None]:
    """(file, state dict in diffusers' names, network alphas) of a LoRA that fits `backbone` (anything with its
    `unet`, `text_encoder`(`_2`) and `NAME`: the loaded model, or the command line's one built on the meta device);
    a ValueError naming the file otherwise."""
    path = lora_file(source, allow_pickle=allow_pickle)
    state, alphas = convert(read_file(path), backbone, path.name)
    if not check_fits(state, backbone, path.name):
        raise ValueError(f"lora: {path.name} has no layers of this model")
    return path, state, alphas


def adapter_names(backbone) -> list[str]:
    """The peft adapters present in the model's parts (e.g. loaded by a diffusers pipeline), in load order."""
    names = []
    for model in parts(backbone).values():
        for name in getattr(model, "peft_config", {}) or {}:
            if name not in names:
                names.append(name)
    return names


def _safe_name(stem: str) -> str:
    name = re.sub(r"\W", "_", stem) or "lora"
    return "_" + name if name[0].isdigit() else name


class LoraSet:
    """The LoRAs of one backbone: loading, weights, fusing, unloading (diffusers' mixin does the work)."""

    def __init__(self, backbone):
        self.backbone = backbone
        self.host = _mixin(backbone)()
        self.host.unet, self.host.text_encoder = backbone.denoiser, backbone.text_encoder
        if getattr(backbone, "text_encoder_2", None) is not None:
            self.host.text_encoder_2 = backbone.text_encoder_2
        # Adapters already in the modules (a diffusers pipeline's, through from_pipe), at their weights as peft has
        # them unknown: 1.0 until set.
        self.loras: dict[str, Lora] = {n: Lora(n, None, None, 1.0) for n in adapter_names(backbone)}
        self.fused = False
        self.permanent = False  # fused and peft's wrappers removed: the LoRAs are part of the weights now

    def check_changeable(self, what: str) -> None:
        if self.permanent:
            raise ValueError(f"{what}: the LoRAs were fused permanently (fuse_lora(permanent=True)); load the model "
                             "again to change them")

    # ------------------------------------------------------------------------------------------ loading

    def load(self, source, adapter_name: str | None, scale, allow_pickle: bool) -> Lora:
        from .image_prompt import file_sha256

        self.check_changeable("load_lora_weights")
        scale = check_scale(scale, "scale")
        if adapter_name is not None:
            if not isinstance(adapter_name, str) or not re.fullmatch(r"[A-Za-z_]\w*", adapter_name):
                raise ValueError(f"adapter_name: expected a name of letters, digits and _, got {adapter_name!r}")
            if adapter_name in self.loras:
                raise ValueError(f"adapter_name: {adapter_name!r} is already loaded; unload it or pick another name")
        path, state, alphas = read_fitting(source, self.backbone, allow_pickle)
        name = adapter_name or self._free_name(_safe_name(path.stem))
        was_fused = self.fused
        self.unfuse()
        try:
            self._inject(state, alphas, name)
        except Exception:
            self.host.delete_adapters([name]) if name in adapter_names(self.backbone) else None
            self._refuse_after(was_fused)
            raise
        lora = Lora(name, path.resolve(), file_sha256(path), scale)
        self.loras[name] = lora
        self.apply_scales()
        if was_fused:
            self.fuse()
        return lora

    def _refuse_after(self, was_fused: bool) -> None:
        if was_fused:
            self.fuse()

    def _inject(self, state, alphas, name) -> None:
        # No `_pipeline`: it is only asked whether offloading hooks must be lifted first (our modules have none).
        host = self.host
        with warnings.catch_warnings():  # several adapters in one model is what set_adapters is for
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            host.load_lora_into_unet(state, network_alphas=alphas, unet=self.backbone.denoiser, adapter_name=name)
            for prefix, model in parts(self.backbone).items():
                if prefix != "unet":
                    host.load_lora_into_text_encoder(state, network_alphas=alphas, text_encoder=model,
                                                     prefix=prefix, adapter_name=name)
        for model in parts(self.backbone).values():  # the new layers where and as their base layers run
            for key, param in model.named_parameters():
                if "lora_" in key:
                    base = next(model.parameters())
                    param.data = param.data.to(base.device, base.dtype)
                    param.requires_grad_(False)

    def _free_name(self, base: str) -> str:
        name, i = base, 2
        taken = set(self.loras) | set(adapter_names(self.backbone))
        while name in taken:
            name, i = f"{base}_{i}", i + 1
        return name

    # ------------------------------------------------------------------------------------------ weights

    def set_scales(self, scales: dict) -> None:
        if not isinstance(scales, dict):
            raise TypeError(f"scales: expected a dict of adapter name -> weight, got {type(scales).__name__}")
        unknown = [n for n in scales if n not in self.loras]
        if unknown:
            raise ValueError(f"scales: no LoRA named {unknown[0]!r}; loaded: {sorted(self.loras)}")
        checked = {n: check_scale(v, f"scales[{n!r}]") for n, v in scales.items()}
        self.check_changeable("set_lora_scales")
        was_fused = self.fused
        self.unfuse()
        for n, v in checked.items():
            self.loras[n].scale = v
        self.apply_scales()
        if was_fused:
            self.fuse()

    def apply_scales(self) -> None:
        if self.loras:
            self.host.set_adapters(list(self.loras), [lora.scale for lora in self.loras.values()])

    def fuse(self, permanent: bool = False) -> None:
        if self.loras and not self.fused:
            self.host.fuse_lora(components=list(parts(self.backbone)), lora_scale=1.0,
                                adapter_names=list(self.loras))
            self.fused = True
        if permanent and self.fused and not self.permanent:
            # diffusers' unload after a fuse swaps each peft wrapper for its base layer, which holds the fused
            # weights: a layer is one call again (the wrappers cost 20 % of an edit on the bundled model).
            self.host.unload_lora_weights()
            self.permanent = True

    def unfuse(self) -> None:
        if self.fused:
            self.check_changeable("unfuse_lora")
            self.host.unfuse_lora(components=list(parts(self.backbone)))
            self.fused = False

    def unload(self, names=None) -> None:
        """Remove the LoRA layers (all, or those named): the model's own layers again, bit for bit when they were
        not fused (unfusing subtracts what fusing added: exact to rounding)."""
        names = list(self.loras) if names is None else ([names] if isinstance(names, str) else list(names))
        unknown = [n for n in names if n not in self.loras]
        if unknown:
            raise ValueError(f"adapter_names: no LoRA named {unknown[0]!r}; loaded: {sorted(self.loras)}")
        self.check_changeable("unload_lora_weights")
        was_fused = self.fused
        self.unfuse()
        if set(names) == set(self.loras):
            self.host.unload_lora_weights()
            self.loras.clear()
            return
        self.host.delete_adapters(names)
        for n in names:
            del self.loras[n]
        self.apply_scales()
        if was_fused:
            self.fuse()

    def records(self) -> list[dict]:
        return [lora.record(self.fused) for lora in self.loras.values()]


def parse_lora_arg(text: str, option: str = "--lora") -> tuple[str, float]:
    """FILE[:SCALE] of the command line: (file, scale); a ValueError naming the option otherwise. A colon followed
    by something that is not a number is part of the file name (e.g. a Windows drive)."""
    path, sep, tail = str(text).rpartition(":")
    if not sep or not path or "/" in tail or "\\" in tail or "." in tail and not _numberish(tail):
        return str(text), 1.0
    try:
        scale = float(tail)
    except ValueError:
        raise ValueError(f"{option} {text}: SCALE {tail!r} is not a number (FILE[:SCALE], e.g. style.safetensors:0.8)")
    if not math.isfinite(scale) or not SCALE_RANGE[0] <= scale <= SCALE_RANGE[1]:
        raise ValueError(f"{option} {text}: SCALE must be a finite number in [{SCALE_RANGE[0]:g}, {SCALE_RANGE[1]:g}]")
    return path, scale


def _numberish(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False
