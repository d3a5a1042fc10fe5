"""Loading a model: which backbone class fits a model's configuration, its components from a diffusers folder, a
hub id or one checkpoint file, and the model's recommended settings file.

Nothing here knows `DragonPipeline`: the loaders return a backbone (and the scheduler config and settings), and the
pipeline's classmethods wrap them. Each base model family (SD1.x, SD2.x, SDXL) is a class in `BACKBONES`, not a
branch here; its defaults (working resolution, CFG and energy scale per task) are a table in the format of a
model's own settings file (`BACKBONE_DEFAULTS`), which the model's file overrides.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

from .backbone import PREDICTION_TYPES, SD1Backbone, SD2Backbone
from .backbone_flux import FluxBackbone
from .backbone_sd3 import SD3Backbone
from .backbone_sdxl import SDXLBackbone
from .limits import BUNDLED_RESOLUTION, DEFAULT_MAX_RESOLUTION, LIMITS, check
from .steps import RULES
from .validate import check_number, shown
from .weights import check_loading_info

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
BUNDLED_ID = "dragondiff:shapes"  # the bundled UNet model (SD1.5's layout)
BUNDLED_FLOW_ID = "dragondiff:shapes-flow"  # the bundled flow transformer (SD3's layout, one CLIP)
BUNDLED_IDS = (BUNDLED_ID, BUNDLED_FLOW_ID)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# A model may ship its own recommended CFG / energy settings per task in this file beside its weights.
SETTINGS_FILE = "dragondiff_defaults.json"
SETTING_KEYS = ("guidance_scale", "energy_scale", "ip_scale")  # what such a file may recommend per task
# Backbone classes, tried in order: each says from a model's UNet configuration whether it has its layout.
BACKBONES = (SDXLBackbone, SD2Backbone, SD1Backbone)
# Flow-matching transformer families, each known by its transformer's configuration (`transformer/` subfolder).
FLOW_BACKBONES = (SD3Backbone, FluxBackbone)
ALL_BACKBONES = BACKBONES + FLOW_BACKBONES
# Per-backbone defaults, in the settings file's format ({"max_resolution": px, "settings": {task: {...}}}); a
# model's own SETTINGS_FILE overrides them key by key. Only what differs from the official SD1.5 values is here;
# docs/backbones.md says how each was chosen and which are untested.
BACKBONE_DEFAULTS = {
    # SDXL works at 1024 px (its training size; 768 px, the official SD1.5 working size, is below it). The energy
    # scale stays the official per-task value: untested on real SDXL weights.
    SDXLBackbone.NAME: {"max_resolution": 1024},
    # SD2.x keeps 768 px: the official working size, and SD2.1-v's training size (SD2.1-base's is 512).
    # SD3/SD3.5 and FLUX.1 work at 1024 px, their training size; energy scales stay the official values (untested
    # on real weights: docs/backbones.md).
    SD3Backbone.NAME: {"max_resolution": 1024},
    # FLUX.1-dev is guidance-distilled: its guidance is embedded (`FluxBackbone.embedded_guidance`), so true CFG is
    # off (guidance_scale 1: one conditional pass per step); a higher guidance_scale turns it on at twice the cost.
    FluxBackbone.NAME: {"max_resolution": 1024, "settings": {"*": {"guidance_scale": 1.0}}},
}


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def cpu_description() -> dict:
    """The CPU's model name, torch's vector ISA for it and whether oneDNN has native bf16 there: CPU timings and
    the worth of bf16 depend on them (the same 2-core machine kind has been an avx512_bf16 Xeon and an AVX2 EPYC)."""
    name = None
    try:
        name = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name")), None)
    except OSError:
        pass
    return {"cpu": name or platform.processor() or platform.machine(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "native_bf16": native_bf16()}


def native_bf16() -> bool:
    """Whether this CPU runs bf16 matrix products and convolutions natively (avx512_bf16 / AMX through oneDNN).
    Without it torch emulates them: measured 7x slower than fp32 for a linear layer and 5-230x for a
    convolution on an AVX2 EPYC (docs/speed.md)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def is_transformer_config(config) -> bool:
    """A transformer's denoiser configuration (by its class, or a patch size without a UNet's block widths)."""
    name = str(config.get("_class_name") or "")
    return "Transformer" in name or "DiT" in name or ("patch_size" in config and "block_out_channels" not in config)


# The smallest denoiser (in parameters) for which `dtype="auto"` picks bf16 on a CPU with native bf16: below it an
# edit is bound by per-call overhead and casts (the bundled 3 M-parameter UNet ran 9-32 % slower per edit in bf16
# at 128 px), above it by arithmetic, where bf16 halves the work (SD1.5 size at 512 px: docs/speed.md).
AUTO_BF16_MIN_PARAMS = 100_000_000


def auto_dtype(device: torch.device, backbone) -> torch.dtype:
    """What dtype=None / "auto" picks: on CUDA float16, bfloat16 for the flow transformers (their released
    precision; FLUX overflows in float16); on a CPU with native bf16 (`native_bf16`) bfloat16 for a model of at
    least AUTO_BF16_MIN_PARAMS denoiser parameters; float32 elsewhere. Latents, energies, their gradients and the
    step arithmetic stay float32 whatever the model's dtype."""
    if device.type == "cuda":
        return torch.bfloat16 if backbone.RULE == "flow-euler" else torch.float16
    if device.type == "cpu" and native_bf16():
        params = sum(p.numel() for p in backbone.denoiser.parameters())
        if params >= AUTO_BF16_MIN_PARAMS:
            return torch.bfloat16
    return torch.float32


def backbone_class(unet_config, scheduler_config=None):
    """The backbone class that runs a model with this UNet or transformer (and scheduler) configuration; a clear
    refusal naming what was found otherwise (a layout no backbone has, or a prediction type no backbone handles)."""
    if is_transformer_config(unet_config):
        return flow_backbone_class(unet_config, scheduler_config)
    prediction = None if scheduler_config is None else scheduler_config.get("prediction_type", "epsilon")
    cls = next((c for c in BACKBONES if c.accepts(unet_config)), None)
    if cls is not None and (prediction is None or prediction in PREDICTION_TYPES):
        return cls
    found = {k: unet_config.get(k) for k in ("addition_embed_type", "class_embed_type", "cross_attention_dim",
                                             "in_channels", "use_linear_projection")}
    found = {k: v for k, v in found.items() if v is not None}
    if prediction is not None:
        found["prediction_type"] = prediction
    what = "layout" if cls is None else "prediction type"
    raise ValueError(f"model: no backbone runs this model's {what} (found {found}); supported: "
                     + "; ".join(c.SUPPORTS for c in BACKBONES)
                     + f"; each predicting one of {', '.join(PREDICTION_TYPES)}; "
                     + "; ".join(c.SUPPORTS for c in FLOW_BACKBONES))


def flow_backbone_class(config, scheduler_config=None):
    """The flow-matching backbone of a transformer configuration, refused by name when no family has its layout,
    when the family refuses this variant (a timestep-distilled FLUX), or when its scheduler is not a flow-matching
    one."""
    cls = next((c for c in FLOW_BACKBONES if c.accepts(config)), None)
    if cls is None:
        name = config.get("_class_name") or "transformer"
        family = OTHER_FAMILIES.get(name, f"a model with a {name}")
        raise ValueError(f"model: {family} is not supported; supported: "
                         + "; ".join(c.SUPPORTS for c in ALL_BACKBONES))
    cls.check_config(config)
    check_scheduler(cls, scheduler_config)
    return cls


def check_scheduler(cls, scheduler_config) -> None:
    """A flow-matching family's scheduler must be a flow-matching one, and a UNet family's must not be (its step
    rule reads the scheduler's configuration: a DDIM ᾱ table is no σ schedule)."""
    name = None if scheduler_config is None else scheduler_config.get("_class_name")
    if name is None or str(name).startswith("FlowMatch") == (cls.RULE == "flow-euler"):
        return
    wanted = "flow matching (FlowMatchEulerDiscreteScheduler)" if cls.RULE == "flow-euler" else \
        "a DDPM-family schedule (DDIMScheduler, PNDMScheduler, ...)"
    raise ValueError(f"scheduler: a {cls.NAME} model is sampled with {wanted}; its scheduler is {name}")


# The parts of a diffusers folder each backbone loads (subfolder: what it holds), checked before any weight is read.
FOLDER_PARTS = {"unet": "model", "vae": "model", "text_encoder": "model", "tokenizer": "tokenizer",
                "scheduler": "scheduler"}
SDXL_PARTS = {**FOLDER_PARTS, "text_encoder_2": "model", "tokenizer_2": "tokenizer"}
FLOW_PARTS = {"transformer": "model", **{k: v for k, v in SDXL_PARTS.items() if k != "unet"}}
PARTS = {SDXLBackbone: SDXL_PARTS, SD3Backbone: FLOW_PARTS, FluxBackbone: FLOW_PARTS}
CONFIG_FILES = {"model": "config.json", "scheduler": "scheduler_config.json", "tokenizer": None}
FLOW_CLASSES = {c.CLASS_NAME for c in FLOW_BACKBONES}  # the transformer classes a flow backbone runs
# Families of diffusers folders no backbone here runs, by the class of their denoiser (model_index.json).
OTHER_FAMILIES = {"PixArtTransformer2DModel": "a PixArt model", "SanaTransformer2DModel": "a Sana model",
                  "HunyuanDiT2DModel": "a Hunyuan-DiT model", "QwenImageTransformer2DModel": "a Qwen-Image model"}


def model_index(folder: Path) -> dict:
    """A local model folder's model_index.json ({} when it has none or it cannot be read: the folder check
    names what is missing)."""
    try:
        data = json.loads((Path(folder) / "model_index.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def check_family(folder: Path) -> None:
    """Refuse, by name, a diffusers folder of a family no backbone here runs (from its model_index.json)."""
    index = model_index(folder)
    for part, entry in index.items():
        cls_name = entry[1] if isinstance(entry, list) and len(entry) == 2 else None
        if part == "transformer" and cls_name and cls_name not in FLOW_CLASSES:
            family = OTHER_FAMILIES.get(cls_name, f"a model with a {cls_name} transformer")
            pipeline = index.get("_class_name", "its pipeline")
            raise ValueError(f"id_or_folder: {folder} is {family} ({pipeline}): not supported yet; supported: "
                             + "; ".join(c.SUPPORTS for c in ALL_BACKBONES))
    if index.get("requires_aesthetics_score") or (
            "text_encoder_2" in index and index.get("text_encoder") in (None, [None, None])):
        raise ValueError(f"id_or_folder: {folder} is an SDXL refiner (requires_aesthetics_score, no "
                         "text_encoder): not supported; use an SDXL base model")


def check_folder(folder: Path, parts: dict, allow_pickle: bool) -> None:
    """Each part of a local diffusers folder there with its configuration and weights, before any is read: the
    refusal names the part's file (`unet/config.json`); pickle-only weights get the allow_pickle hint."""
    index = model_index(folder)
    for part, kind in parts.items():
        if index.get(part, "") in ([None, None], (None, None)):
            continue  # an optional part the folder says it leaves out (its backbone decides whether it may)
        sub = Path(folder) / part
        if not sub.is_dir():
            raise ValueError(f"id_or_folder: {folder} has no {part}/ folder (a diffusers model folder has "
                             f"{', '.join(p + '/' for p in parts)})")
        config = CONFIG_FILES[kind]
        if config is not None and not (sub / config).is_file():
            raise ValueError(f"id_or_folder: {part}/{config} is missing in {folder}")
        if kind != "model":
            continue
        names = [p.name for p in sub.iterdir() if p.is_file()]
        if any(n.endswith(".safetensors") for n in names):
            continue
        if any(n.endswith(".bin") for n in names):
            if allow_pickle:
                continue
            raise ValueError(f"id_or_folder: {part}/ in {folder} has only pickle (.bin) weights; only .safetensors "
                             "weights are loaded unless allow_pickle=True")
        raise ValueError(f"id_or_folder: {part}/ in {folder} has no weights file (expected a .safetensors file)")


def backbone_defaults(name: str) -> dict:
    """A backbone's default working resolution and per-task settings ({} entries: the official SD1.5 values)."""
    from .tasks import TASKS

    defaults = dict(BACKBONE_DEFAULTS.get(name, {}))
    every = defaults.get("settings", {}).get("*")  # "*": the same settings for every task
    if every is not None:
        defaults["settings"] = {task: dict(every) for task in TASKS}
    return defaults


def is_bundled(id_or_folder) -> bool:
    """One of the models shipped inside the package (`BUNDLED_IDS`)."""
    return str(id_or_folder) in BUNDLED_IDS


def bundled_folder(model_id: str) -> Path:
    """The folder inside the package that holds a bundled model's weights."""
    from .shapes import model as shapes_model

    return shapes_model.FLOW_WEIGHTS if str(model_id) == BUNDLED_FLOW_ID else shapes_model.WEIGHTS


def bundled_available(model_id: str) -> bool:
    """Whether a bundled model's weights are in this installation (its denoiser's safetensors)."""
    return any(bundled_folder(model_id).glob("*/diffusion_pytorch_model*.safetensors"))


def resolve_source(id_or_folder) -> tuple[str, bool]:
    """(source to load from, local only): a bundled model's id becomes its folder inside the package."""
    source = str(id_or_folder)
    if not is_bundled(source):
        return source, False
    if not bundled_available(source):
        raise ValueError(f"id_or_folder: {source!r} weights are not in this installation")
    return str(bundled_folder(source)), True


def looks_local(source: str) -> bool:
    """A path rather than a hub id ('owner/name')."""
    return (Path(source).is_absolute() or source.startswith((".", "~")) or source.count("/") != 1
            or Path(source).exists())


def load_pretrained(id_or_folder, *, local_files_only: bool = False, allow_pickle: bool = False):
    """(backbone, scheduler, the model's settings file as `read_model_file` gives it) of a diffusers layout (hub id
    or folder). Safetensors only unless allow_pickle=True."""
    source, bundled_only = resolve_source(id_or_folder)
    if looks_local(source) and not Path(source).is_dir():
        raise ValueError(f"id_or_folder: {source} is not a folder (a local model is a diffusers folder; a hub id "
                         "looks like 'owner/name')")
    common = {"local_files_only": local_files_only or bundled_only}
    safe = None if allow_pickle else True
    local = Path(source).is_dir()
    if local:  # what is wrong with a local folder is named by its part, before any weight is read
        check_family(Path(source))
        check_folder(Path(source), {denoiser_part(source): "model", "scheduler": "scheduler"}, allow_pickle)
        own = read_model_file(source)
    try:
        unet_config, scheduler_config = read_configs(source, **common)
    except (OSError, EnvironmentError, ValueError) as e:
        where = "" if Path(source).exists() else (" (no such local folder; as a hub id it is neither cached here nor "
                                                  "reachable: offline, or no such repository)")
        raise ValueError(f"id_or_folder: cannot load a model from {source!r}{where}: {e}") from e
    cls = backbone_class(unet_config, scheduler_config)
    scheduler = RULES[cls.RULE](scheduler_config).scheduler()
    if local:
        check_folder(Path(source), PARTS.get(cls, FOLDER_PARTS), allow_pickle)
    try:
        backbone = cls.from_pretrained(source, use_safetensors=safe, **common)
    except (OSError, EnvironmentError, ValueError) as e:
        # a hub snapshot is not checked file by file: the hint where its weights may be pickle-only
        hint = (" (only .safetensors weights are loaded unless allow_pickle=True)"
                if not local and not allow_pickle and ".safetensors" in str(e) else "")
        raise ValueError(f"id_or_folder: cannot load an {cls.NAME} model from {source!r}{hint}: {e}") from e
    return backbone, scheduler, own if local else read_model_file(source)


def denoiser_part(source: str) -> str:
    """The subfolder of a local diffusers folder that holds its denoiser: "transformer" for a transformer model
    (a folder with transformer/ and no unet/), else "unet"."""
    folder = Path(source)
    return "transformer" if (folder / "transformer").is_dir() and not (folder / "unet").is_dir() else "unet"


def read_configs(source: str, **common) -> tuple[dict, dict]:
    """(denoiser configuration, scheduler configuration) of a diffusers layout, without weights: the UNet's, or
    the transformer's for a transformer model (a hub id without unet/ is tried for transformer/)."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    part = denoiser_part(source)
    try:
        config = UNet2DConditionModel.load_config(source, subfolder=part, **common)
    except (OSError, EnvironmentError, ValueError):
        if Path(source).is_dir() or part == "transformer":
            raise
        config = UNet2DConditionModel.load_config(source, subfolder="transformer", **common)
    return config, DDIMScheduler.load_config(source, subfolder="scheduler", **common)


def load_single_file(path, *, config, local_files_only: bool = False, allow_pickle: bool = False):
    """(backbone, scheduler) of one original-layout checkpoint; `config` (a diffusers folder or hub id of the same
    family) gives the component configs and tokenizers, and picks the backbone class and diffusers' converter."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import SingleFileComponentError

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
    if path.suffix.lower() == ".safetensors" and is_ip_adapter_file(path):
        raise ValueError(f"path: {path.name} is an IP-Adapter file (image_proj./ip_adapter. weights), not a model "
                         "checkpoint; give it with --ip-adapter (load_ip_adapter) beside a model")
    try:
        unet_config = UNet2DConditionModel.load_config(str(config), subfolder="unet",
                                                       local_files_only=local_files_only)
    except (OSError, EnvironmentError, ValueError) as e:
        raise ValueError(f"config: cannot read a UNet configuration from {str(config)!r} (a diffusers folder or hub "
                         f"id of the checkpoint's family): {e}") from e
    cls = backbone_class(unet_config)
    loader = StableDiffusionXLPipeline if cls is SDXLBackbone else StableDiffusionPipeline
    extra = {} if cls is SDXLBackbone else {"safety_checker": None, "requires_safety_checker": False}
    try:
        sd = loader.from_single_file(str(path), config=str(config), local_files_only=local_files_only, **extra)
    except (OSError, EnvironmentError, ValueError, KeyError, SingleFileComponentError) as e:
        raise ValueError(f"path: cannot load {path.name} as an {cls.NAME} checkpoint with config {config!r}: "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):  # weights the file lacks stay on meta
        if getattr(sd, part, None) is not None:
            check_loading_info(getattr(sd, part), {}, f"{path.name}: {part}")
    backbone_class(sd.unet.config, sd.scheduler.config)  # the prediction type, checked before building
    parts = {"text_encoder_2": sd.text_encoder_2, "tokenizer_2": sd.tokenizer_2,
             "force_zeros_for_empty_prompt": sd.config.get("force_zeros_for_empty_prompt", True)} \
        if cls is SDXLBackbone else {}
    return cls.from_components(sd.unet, sd.vae, sd.text_encoder, sd.tokenizer, **parts), sd.scheduler


def is_ip_adapter_file(path: Path) -> bool:
    """Whether a .safetensors file holds an IP-Adapter's weights (every key under image_proj. / ip_adapter.), read
    from its header alone."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception:  # noqa: BLE001 (not readable as safetensors: the checkpoint loader says why)
        return False
    return bool(keys) and all(k.startswith(("image_proj.", "ip_adapter.")) for k in keys)


def describe_model(id_or_folder) -> dict | None:
    """What a model is, from its configuration files alone (no weights loaded), for checks before loading and for
    `info`: {"backbone", "prediction_type", "vae_factor", "feature_factor", "default_max_resolution",
    "recommended_settings"}; None when the configuration cannot be read here (a single file, or a hub id that is
    not cached). Raises the load-time refusal for a model no backbone runs."""
    from diffusers import AutoencoderKL

    try:
        source, _ = resolve_source(id_or_folder)
        if Path(source).is_file():
            return None
        common = {"local_files_only": True}
        denoiser, scheduler = read_configs(source, **common)
        vae = AutoencoderKL.load_config(source, subfolder="vae", **common)
    except (OSError, EnvironmentError, ValueError):
        return None
    cls = backbone_class(denoiser, scheduler)
    defaults = model_defaults(cls.NAME, read_model_file(source))
    resolution = BUNDLED_RESOLUTION if is_bundled(id_or_folder) else defaults["max_resolution"]
    prediction = "flow" if cls.RULE == "flow-euler" else scheduler.get("prediction_type", "epsilon")
    return {"backbone": cls.NAME, "prediction_type": prediction,
            "vae_factor": 2 ** (len(vae["block_out_channels"]) - 1), "feature_factor": cls.grid_factor(denoiser),
            "default_max_resolution": resolution, "recommended_settings": defaults["settings"]}


def model_factors(id_or_folder) -> tuple[int, int] | None:
    """(vae_factor, feature_factor) of a model from its configuration files alone (no weights loaded), for checks
    before loading; None when the configuration cannot be read here (e.g. a hub id that is not cached)."""
    try:
        info = describe_model(id_or_folder)
    except ValueError:
        return None
    return None if info is None else (info["vae_factor"], info["feature_factor"])


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


def read_model_file(folder) -> dict:
    """SETTINGS_FILE of a local model folder, checked: {"settings": {...}, "max_resolution": px} with the keys it
    has ({} when there is none)."""
    path = Path(folder) / SETTINGS_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path}: not a valid settings file ({e})") from e
    return check_model_file(data, str(path))


def check_model_file(data, name: str) -> dict:
    """A settings file's content (or a BACKBONE_DEFAULTS entry), checked against the edit limits."""
    if not isinstance(data, dict):
        raise TypeError(f"{name}: expected an object with 'settings' and/or 'max_resolution'")
    out = {}
    if "settings" in data:
        out["settings"] = check_settings(data["settings"], name)
    if data.get("max_resolution") is not None:
        out["max_resolution"] = check("max_resolution", data["max_resolution"], f"{name}['max_resolution']")
    return out


def read_settings(folder) -> dict:
    """The model's recommended settings from SETTINGS_FILE in a local model folder ({} when there is none)."""
    return read_model_file(folder).get("settings", {})


def model_defaults(backbone: str, own: dict | None = None) -> dict:
    """{"max_resolution": px, "settings": {task: {...}}} of a model: its own file's values (`own`, as
    `read_model_file` gives them) over its backbone's (`BACKBONE_DEFAULTS`), task by task and key by key; the
    official working resolution when neither gives one. Tasks neither names keep the registry's official values."""
    base = check_model_file(backbone_defaults(backbone), f"BACKBONE_DEFAULTS[{backbone!r}]")
    own = own or {}
    settings = {task: dict(values) for task, values in base.get("settings", {}).items()}
    for task, values in own.get("settings", {}).items():
        settings.setdefault(task, {}).update(values)
    resolution = own.get("max_resolution", base.get("max_resolution", DEFAULT_MAX_RESOLUTION))
    return {"max_resolution": resolution, "settings": settings}
