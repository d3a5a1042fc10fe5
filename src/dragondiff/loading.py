"""Loading a model: which backbone class fits a model's configuration, its components from a diffusers folder, a
hub id or one checkpoint file, and the model's recommended settings file.

Nothing here knows `DragonPipeline`: the loaders return a backbone (and the scheduler config and settings), and the
pipeline's classmethods wrap them. A second backbone (SD2.x, SDXL) is a class in `BACKBONES`, not a branch here.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .backbone import SD1Backbone
from .limits import LIMITS
from .validate import check_number, shown

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
BUNDLED_ID = "dragondiff:shapes"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# A model may ship its own recommended CFG / energy settings per task in this file beside its weights.
SETTINGS_FILE = "dragondiff_defaults.json"
SETTING_KEYS = ("guidance_scale", "energy_scale", "ip_scale")  # what such a file may recommend per task
# Backbone classes, tried in order: each says from a model's configuration whether it can run it.
BACKBONES = (SD1Backbone,)


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def backbone_class(unet_config, scheduler_config=None):
    """The backbone class that runs a model with this UNet (and scheduler) configuration; a clear refusal
    naming what was found otherwise."""
    for cls in BACKBONES:
        if cls.accepts(unet_config, scheduler_config):
            return cls
    found = {k: unet_config.get(k) for k in ("addition_embed_type", "cross_attention_dim", "in_channels")}
    if scheduler_config is not None:
        found["prediction_type"] = scheduler_config.get("prediction_type", "epsilon")
    raise ValueError(f"model: no backbone runs this model (found {found}); supported: "
                     + "; ".join(cls.SUPPORTS for cls in BACKBONES))


def resolve_source(id_or_folder) -> tuple[str, bool]:
    """(source to load from, local only): the bundled model's id becomes its folder inside the package."""
    source = str(id_or_folder)
    if source != BUNDLED_ID:
        return source, False
    from .shapes import model as shapes_model

    if not shapes_model.is_available():
        raise ValueError(f"id_or_folder: {BUNDLED_ID!r} weights are not in this installation")
    return str(shapes_model.WEIGHTS), True


def looks_local(source: str) -> bool:
    """A path rather than a hub id ('owner/name')."""
    return (Path(source).is_absolute() or source.startswith((".", "~")) or source.count("/") != 1
            or Path(source).exists())


def load_pretrained(id_or_folder, *, local_files_only: bool = False, allow_pickle: bool = False):
    """(backbone, scheduler, recommended settings) of a diffusers layout (hub id or folder). Safetensors only
    unless allow_pickle=True."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    source, bundled_only = resolve_source(id_or_folder)
    if looks_local(source) and not Path(source).is_dir():
        raise ValueError(f"id_or_folder: {source} is not a folder (a local model is a diffusers folder; a hub id "
                         "looks like 'owner/name')")
    common = {"local_files_only": local_files_only or bundled_only}
    safe = None if allow_pickle else True
    hint = "" if allow_pickle else " (only .safetensors weights are loaded unless allow_pickle=True)"
    try:
        unet_config = UNet2DConditionModel.load_config(source, subfolder="unet", **common)
        scheduler = DDIMScheduler.from_pretrained(source, subfolder="scheduler", **common)
    except (OSError, EnvironmentError, ValueError) as e:
        where = "" if Path(source).exists() else (" (no such local folder; as a hub id it is neither cached here nor "
                                                  "reachable: offline, or no such repository)")
        raise ValueError(f"id_or_folder: cannot load a model from {source!r}{where or hint}: {e}") from e
    cls = backbone_class(unet_config, scheduler.config)
    try:
        backbone = cls.from_pretrained(source, use_safetensors=safe, **common)
    except (OSError, EnvironmentError, ValueError) as e:
        raise ValueError(f"id_or_folder: cannot load an {cls.NAME} model from {source!r}{hint}: {e}") from e
    return backbone, scheduler, read_settings(source)


def load_single_file(path, *, config, local_files_only: bool = False, allow_pickle: bool = False):
    """(backbone, scheduler) of one original-layout checkpoint; `config` gives the component configs."""
    from diffusers import StableDiffusionPipeline

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: checkpoint not found: {path}")
    if path.suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
        raise ValueError(
            f"path: {path.name} is a pickle checkpoint, which can run arbitrary code when loaded; "
            "convert it to .safetensors or pass allow_pickle=True if you trust it"
        )
    if path.suffix.lower() not in PICKLE_SUFFIXES + (".safetensors",):
        raise ValueError(f"path: expected a .safetensors (or, with allow_pickle, .ckpt) file, got {path.name}")
    try:
        sd = StableDiffusionPipeline.from_single_file(
            str(path), config=str(config), local_files_only=local_files_only,
            safety_checker=None, requires_safety_checker=False,
        )
    except (OSError, EnvironmentError, ValueError, KeyError) as e:
        raise ValueError(f"path: cannot load {path.name} as an SD1.x checkpoint with config {config!r}: {e}") from e
    cls = backbone_class(sd.unet.config, sd.scheduler.config)
    return cls(sd.unet, sd.vae, sd.text_encoder, sd.tokenizer), sd.scheduler


def model_factors(id_or_folder) -> tuple[int, int] | None:
    """(vae_factor, feature_factor) of a model from its configuration files alone (no weights loaded), for checks
    before loading; None when the configuration cannot be read here (e.g. a hub id that is not cached)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    try:
        source, _ = resolve_source(id_or_folder)
        if Path(source).is_file():
            return None
        common = {"local_files_only": True}
        unet = UNet2DConditionModel.load_config(source, subfolder="unet", **common)
        scheduler = DDIMScheduler.load_config(source, subfolder="scheduler", **common)
        vae = AutoencoderKL.load_config(source, subfolder="vae", **common)
        cls = backbone_class(unet, scheduler)
    except (OSError, EnvironmentError, ValueError):
        return None
    return 2 ** (len(vae["block_out_channels"]) - 1), cls.FEATURE_FACTOR


def check_settings(settings: dict, name: str) -> dict:
    """Validate a recommended-settings table {task: {"guidance_scale": x, "energy_scale": y, "ip_scale": z}}
    against the same limits an edit has (a value this accepts is never refused at edit time)."""
    from .tasks import TASKS

    if not isinstance(settings, dict):
        raise TypeError(f"{name}: expected a dict of task -> settings, got {type(settings).__name__}")
    out = {}
    for task, values in settings.items():
        if task not in TASKS:
            raise ValueError(f"{name}: unknown task {shown(task)}; allowed: {sorted(TASKS)}")
        if not isinstance(values, dict) or not set(values) <= set(SETTING_KEYS):
            raise ValueError(f"{name}[{task!r}]: expected a dict with some of {', '.join(SETTING_KEYS)}, "
                             f"got {shown(values)}")
        out[task] = {k: check_number(v, f"{name}[{task!r}][{k!r}]", LIMITS[k].low, LIMITS[k].high)
                     for k, v in values.items()}
    return out


def read_settings(folder) -> dict:
    """The model's recommended settings from SETTINGS_FILE in a local model folder ({} when there is none)."""
    path = Path(folder) / SETTINGS_FILE
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return check_settings(data.get("settings", {}), str(path))
