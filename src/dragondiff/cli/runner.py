"""Running edits from the command line: checking outputs before any model work, loading the model once, saving the
result (at the input's size by default), its sidecar and an optional preview, atomically."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import click

from ..spec import EditSpec
from . import signals

IMAGE_SUFFIXES = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


class InputError(click.ClickException):
    """Bad input found by us (a spec field, a file, an output path): exit code 2, like a usage error."""

    exit_code = 2


@dataclass
class Job:
    """One edit to run: the spec, where its result goes, and a label for messages (spec file entry, sample)."""

    spec: EditSpec
    output: Path
    label: str
    inputs: list[Path] = field(default_factory=list)  # files the job reads (never overwritten): spec file etc.
    # Images the job writes beside its output, which its spec names (batch: the DragBench mask, so that the sidecar
    # re-runs the edit). The edit reads them from memory; they are written with its result, never before (a failed
    # edit must not have replaced them). They are outputs of the job, not inputs.
    writes: list[tuple[Path, object]] = field(default_factory=list)
    # The pre-check's `planning.Plan` of a single-edit command, handed to the edit (a run of many jobs plans each
    # again when it runs, so that only one job's inputs are held at a time).
    plan: object = None

    @property
    def sidecar(self) -> Path:
        return self.output.with_suffix(".json")

    @property
    def preview(self) -> Path:
        return self.output.with_name(self.output.stem + "-preview.png")

    def outputs(self, preview: bool) -> list[Path]:
        return [path for path, _ in self.writes] + [self.output, self.sidecar] + ([self.preview] if preview else [])

    def input_files(self) -> set[Path]:
        files = {Path(p).resolve() for p in self.inputs}
        for _, value in [("image", self.spec.image), *self.spec.params.sources()]:
            if isinstance(value, str):
                files.add(Path(value).resolve())
        return files - {path.resolve() for path, _ in self.writes}

    def written_by_us(self) -> bool:
        """Whether a dragondiff sidecar lies where this job writes its own: then the files of this job that
        exist were written by an earlier run of it (the sidecar is written last: with its output, the job is
        finished)."""
        from ..provenance import is_sidecar

        try:
            return self.sidecar.is_file() and is_sidecar(json.loads(self.sidecar.read_text()))
        except (OSError, ValueError):
            return False


def temp_path(path: Path) -> Path:
    """The temporary file beside `path` that a write renames to it: hidden, unique to this process, and short
    whatever the length of `path`'s name (any name the file system takes works), named after a digest of that name
    so that the files a dead process left can be found (`leftover_temps`)."""
    path = Path(path)
    return path.with_name(f"{_temp_stem(path)}{os.getpid()}.tmp")


def _temp_stem(path: Path) -> str:
    return f".dd-{hashlib.sha256(os.fsencode(path.name)).hexdigest()[:16]}-"


def leftover_temps(path: Path) -> list[Path]:
    """The temporary files of `path` that any process left (one that died mid-write)."""
    path = Path(path)
    return sorted(path.parent.glob(f"{_temp_stem(path)}*.tmp")) if path.parent.is_dir() else []


def write_problem(folder: Path, names=()) -> str | None:
    """Why nothing can be written in `folder`, or not under one of `names`, found by trying the real operation (as
    root, `os.access` says yes to a read-only file system or /proc): create the missing folders as a write would,
    create and remove the temporary file of each name and the name itself (unless it exists: the name is then
    legal), then remove the folders this made. None when all of it works."""
    folder = Path(os.path.abspath(folder))
    missing, existing = [], folder
    try:
        while not existing.exists():
            missing.append(existing)
            existing = existing.parent
    except OSError as e:  # a folder name longer than the file system takes
        return e.strerror or str(e)
    if not existing.is_dir():
        return f"{existing} is not a folder"
    created: list[Path] = []
    try:
        for path in reversed(missing):
            path.mkdir()
            created.append(path)
        for name in names or ["dragondiff-write-check"]:
            _try_create(temp_path(folder / name))
            if not (folder / name).exists():
                _try_create(folder / name)
        return None
    except OSError as e:  # /proc answers "no such file" for any new name
        return "the file system creates no files there" if e.errno == errno.ENOENT else (e.strerror or str(e))
    finally:
        for path in reversed(created):
            with contextlib.suppress(OSError):
                path.rmdir()


def _try_create(path: Path) -> None:
    """Create `path` (which does not exist) and remove it again; a signal waits until it is gone."""
    with signals.deferred():
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(path)


def check_output(path: Path, overwrite: bool, label: str = "output", image: bool = True, *,
                 exists: str = "exists", probed: dict | None = None, option: str = "-o") -> None:
    """An output path: an image suffix (for images), not a folder, not an existing file unless `overwrite`, and a
    folder where it and its temporary file can be written (tried: `write_problem`; `probed` caches the folder's
    answer across calls). `exists` words the refusal of an existing file; `option` is what the user gives to choose
    another (-o, --out, TARGET)."""
    path = Path(path)
    if image and path.suffix.lower() not in IMAGE_SUFFIXES:
        raise InputError(f"{label}: {path} has no image suffix; use one of {', '.join(IMAGE_SUFFIXES)}")
    try:
        is_dir, is_there = path.is_dir(), path.exists()
    except OSError as e:  # a name longer than the file system takes
        raise InputError(f"{label}: cannot write {path} ({e.strerror or e})") from e
    if is_dir:
        raise InputError(f"{label}: {path} is a folder")
    if is_there and not overwrite:
        raise InputError(f"{label}: {path} {exists}; pass --overwrite to replace it or choose another {option}")
    folder = Path(os.path.abspath(path.parent))
    if probed is None or folder not in probed:
        problem = write_problem(folder)
        if probed is not None:
            probed[folder] = problem
    else:
        problem = probed[folder]
    if not problem:  # the folder takes files: does it take this name?
        problem = write_problem(folder, [path.name])
    if problem:
        raise InputError(f"{label}: cannot write {path} ({problem})")


MAX_LISTED = 20


def check_jobs(jobs: list[Job], overwrite: bool, preview: bool, resume: bool = False) -> list[Job]:
    """Before any model work: every output writable (tried), none of them a file any job reads, no two jobs
    writing one file, no existing file replaced without `overwrite`. With `resume` (batch), a job whose output
    exists with a dragondiff sidecar beside it is finished and skipped, and the files of a job whose sidecar is
    ours may be replaced; any other existing file needs `overwrite`. Every problem is listed, job by job, in one
    InputError. Returns the jobs to run."""
    readers: dict[Path, str] = {}
    for job in jobs:
        for path in job.input_files():
            readers.setdefault(path, job.label)
    seen: dict[Path, str] = {}
    probed: dict[Path, str | None] = {}
    problems, pending = [], []
    for job in jobs:
        ours = resume and job.written_by_us()
        finished = ours and not overwrite and job.output.exists()
        for path in job.outputs(preview):
            resolved = path.resolve()
            if resolved in readers:
                reader = readers[resolved]
                problems.append(f"{job.label}: output {path} is one of the edit's own inputs; choose another -o"
                                if reader == job.label else f"{job.label}: output {path} is read by {reader}")
            elif resolved in seen:
                problems.append(f"{job.label}: output {path} is also written by {seen[resolved]}; give each edit "
                                "its own output")
            else:
                seen[resolved] = job.label
                if finished:
                    continue
                try:
                    check_output(path, overwrite or ours, f"{job.label}: output", image=path != job.sidecar,
                                 exists="exists and was not written by dragondiff (no sidecar "
                                        f"{job.sidecar.name} beside it)" if resume else "exists", probed=probed)
                except InputError as e:
                    problems.append(e.format_message())
        if not finished:
            pending.append(job)
    if len(problems) == 1:
        raise InputError(problems[0])
    if problems:
        listed = problems[:MAX_LISTED] + ([f"... and {len(problems) - MAX_LISTED} more"]
                                           if len(problems) > MAX_LISTED else [])
        raise InputError(f"{len(problems)} outputs cannot be written (nothing was run):\n  " + "\n  ".join(listed))
    return pending


def check_inputs(spec: EditSpec, label: str, model: str | None = None):
    """Read every image and mask of the spec (no model): missing files, unreadable images, mask sizes, points.
    Which fields are files, and whose size each mask has, comes from the task's Params. With `model`, also every
    check the edit itself makes before its first model call (geometry at the working size: `planning.plan_edit`),
    on the model's grid read from its configuration; returns that `Plan` (None without `model`)."""
    from ..inputs import load_image
    from ..tasks.params import kind_of

    try:
        images = {"image": load_image(spec.image, "image")}
        # images first: a mask is checked against the size of the image its `of` names
        for f in sorted(spec.params.fields(), key=lambda field: not kind_of(field).read_first):
            value = getattr(spec.params, f.name)
            if value is not None:
                image = kind_of(f).read(f, value, images)
                if image is not None:
                    images[f.name] = image
        return None if model is None else plan_geometry(spec, model)
    except (ValueError, TypeError, FileNotFoundError) as e:
        raise InputError(f"{label}: {e}") from e


def plan_geometry(spec: EditSpec, model: str):
    """Resolve, prepare and build the edit as the pipeline would, without loading `model` (its grid factors,
    default working size and recommended settings come from its files; SD1's grid when they cannot be read).
    Returns the `Plan`, which the edit takes as it is when the loaded model has the same grid and settings."""
    from ..limits import BUNDLED_RESOLUTION, DEFAULT_MAX_RESOLUTION
    from ..loading import describe_model, is_bundled
    from ..planning import plan_edit

    try:
        info = describe_model(model)
    except ValueError:  # a model no backbone runs: loading it says so
        info = None
    if info is None:
        factors, recommended = (8, 2), {}
        resolution = BUNDLED_RESOLUTION if is_bundled(model) else DEFAULT_MAX_RESOLUTION
    else:
        factors = (info["vae_factor"], info["feature_factor"])
        recommended, resolution = info["recommended_settings"], info["default_max_resolution"]
    return plan_edit(spec, factors=factors, recommended=recommended, default_max_resolution=resolution)


def output_name(stem: str, k: int, count: int) -> str:
    """The result file of edit k of a spec file holding `count` edits: <stem>.png, or <stem>-<k>.png."""
    return f"{stem}.png" if count == 1 else f"{stem}-{k}.png"


def quiet_third_party() -> None:
    """Loading messages and progress bars of diffusers/transformers are noise on a command line."""
    import diffusers
    import huggingface_hub
    import transformers

    huggingface_hub.utils.logging.set_verbosity_error()  # its download retries print one line each
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)


SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
SINGLE_FILE_NEEDS_CONFIG = ("a single-file checkpoint needs --config (a diffusers folder or hub id with the component "
                            "configs)")


def check_model_options(opts: dict, jobs=(), model: str | None = None) -> None:
    """Before loading anything (and in --dry-run), every refusal the load itself would give only after reading the
    weights: --device and --dtype as the pipeline checks them, --model and --config, then the image prompt's options
    (`check_ip_options`). `model`: the model the run loads (a sidecar's), else --model."""
    from ..validate import check_device, check_dtype

    try:
        if opts.get("device") is not None:
            check_device(opts["device"], "--device")
        if opts.get("dtype") not in (None, "auto"):
            check_dtype(opts["dtype"], "--dtype")
    except ValueError as e:
        raise InputError(str(e)) from e
    model = model or opts["model"]
    check_model_source(model, opts.get("config"))
    check_ip_options(opts, jobs, model)
    check_lora_fit(opts.get("loras") or (), model, opts.get("config"))


def check_model_source(model: str, config: str | None) -> None:
    """A local --model is a diffusers folder whose configuration reads (of a family we run), or one checkpoint file
    with --config; --config goes only with such a file. Hub ids are left to the load (they may not be cached)."""
    from ..loading import describe_model, is_bundled, looks_local

    path = Path(model)
    if model.endswith(SINGLE_FILE_SUFFIXES):
        if not path.is_file():
            raise InputError(f"--model {model}: no such file")
        if config is None:
            raise InputError(f"--model {model}: {SINGLE_FILE_NEEDS_CONFIG}")
        return
    if config is not None:
        raise InputError(f"--config {config}: only for a single-file --model (.safetensors); {model} has its own "
                         "component configs")
    if is_bundled(model) or not looks_local(model):
        return
    if not path.is_dir():
        what = "no such file or folder" if not path.exists() else "neither a folder nor a .safetensors file"
        raise InputError(f"--model {model}: {what} (a local model is a diffusers folder, or one .safetensors file "
                         "with --config)")
    try:
        described = describe_model(model)
    except ValueError as e:
        raise InputError(f"--model {model}: {e}") from e
    if described is None:
        raise InputError(f"--model {model}: not a diffusers model folder (its unet/, scheduler/ and vae/ "
                         "configurations cannot be read)")


def check_ip_options(opts: dict, jobs=(), model: str | None = None) -> None:
    """Before loading anything: --ip-adapter readable as an adapter and fitting `model`'s UNet, its --image-encoder
    given, no image-prompt option (--image-encoder, --ip-scale, --ip-routing) without it, and no spec asking for an
    image prompt without one."""
    adapter, encoder = opts.get("ip_adapter"), opts.get("image_encoder")
    if adapter is None:
        for name in ("image_encoder", "ip_scale", "ip_routing"):
            if opts.get(name) is not None:
                raise InputError(f"--{name.replace('_', '-')}: given without --ip-adapter")
        for job in jobs:
            if job.spec.image_prompt:
                raise InputError(f"{job.label}: image_prompt is true; give the adapter with --ip-adapter")
        return
    from ..image_prompt import read_adapter_file

    try:
        proj, layers = read_adapter_file(adapter, allow_pickle=False)
        if model is not None:
            check_adapter_fit(proj, layers, model, opts.get("config"))
        else:
            from ..image_prompt import detect_variant

            detect_variant(proj)
    except (ValueError, FileNotFoundError) as e:
        raise InputError(f"--ip-adapter {adapter}: {e}") from e
    if encoder is None:
        raise InputError("--image-encoder: --ip-adapter needs the CLIP image encoder it was trained with (a "
                         "CLIPVisionModelWithProjection folder or hub id)")


def check_adapter_fit(proj: dict, layers: dict, model: str, config: str | None) -> None:
    """The adapter's projection and layers against the model's UNet, built from its configuration on the meta
    device (no weights, no memory): the checks `image_prompt.from_state` makes after the model loads. Only the
    variant is checked when the configuration cannot be read here (a hub id not cached: the load checks the rest)."""
    import torch
    from diffusers import UNet2DConditionModel

    from ..image_prompt import build_layers, build_projection, detect_variant

    variant, _ = detect_variant(proj)
    unet_config = model_config(model, config, UNet2DConditionModel, "unet")
    if unet_config is None:
        return
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")  # torch: "copying ... to a meta parameter is a no-op" (the shapes are checked)
        unet = UNet2DConditionModel.from_config(unet_config)
        build_projection(proj, variant, unet.config.cross_attention_dim)
        build_layers(unet, layers)


def model_config(model: str, config: str | None, cls, subfolder: str):
    """The configuration of one of the model's components (`cls`: its diffusers or transformers class) as read
    without the network; None when it cannot be read here (a hub id not cached: the load checks what it would)."""
    from ..loading import resolve_source

    source = config if model.endswith(SINGLE_FILE_SUFFIXES) else resolve_source(model)[0]
    try:
        if hasattr(cls, "load_config"):  # diffusers
            return cls.load_config(source, subfolder=subfolder, local_files_only=True)
        return cls.config_class.from_pretrained(source, subfolder=subfolder, local_files_only=True)
    except (OSError, ValueError, TypeError):
        return None


def meta_model(model: str, config: str | None):
    """The model's UNet and text encoder(s) built from their configurations on the meta device (no weights, no
    memory), as a stand-in backbone with the family's NAME for `lora.read_fitting`; None when a configuration cannot
    be read here."""
    import types

    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from ..loading import backbone_class

    unet_config = model_config(model, config, UNet2DConditionModel, "unet")
    if unet_config is None:
        return None
    try:
        cls = backbone_class(unet_config)
    except ValueError:
        return None  # check_model_source names the model's layout
    encoders = {"text_encoder": CLIPTextModel}
    if cls.NAME == "SDXL":
        encoders["text_encoder_2"] = CLIPTextModelWithProjection
    configs = {name: model_config(model, config, c, name) for name, c in encoders.items()}
    if any(c is None for c in configs.values()):
        return None
    with torch.device("meta"):
        built = {name: encoders[name]._from_config(c) for name, c in configs.items()}
        return types.SimpleNamespace(NAME=cls.NAME, denoiser=UNet2DConditionModel.from_config(unet_config),
                                     text_encoder_2=None, **built)


def check_lora_fit(loras, model: str, config: str | None) -> None:
    """Before loading anything: each --lora file is a LoRA whose layers and shapes fit the model's UNet and text
    encoder(s), built on the meta device (`meta_model`); the checks `load_lora_weights` makes after the load. Only the
    file itself is checked when the model's configuration cannot be read here."""
    from ..lora import lora_file, read_file, read_fitting

    stand_in = meta_model(model, config) if loras else None
    for path, _ in loras:
        try:
            if stand_in is None:
                read_file(lora_file(path))
            else:
                read_fitting(path, stand_in)
        except ValueError as e:
            raise InputError(f"--lora {path}: {str(e).removeprefix('lora: ')}") from e


def load_pipeline(model: str, config: str | None, device, dtype, threads: int, vae_tiling: bool = False,
                  ip_adapter: str | None = None, image_encoder: str | None = None, compile_unet: bool = False,
                  channels_last: bool = False, gradient_checkpointing: bool = False):
    """Load the model once; single .safetensors files need --config."""
    import torch

    from ..pipeline import DragonPipeline

    torch.set_num_threads(threads)
    quiet_third_party()
    try:
        if model.endswith(SINGLE_FILE_SUFFIXES):
            if config is None:
                raise InputError(f"--model {model}: {SINGLE_FILE_NEEDS_CONFIG}")
            pipe = DragonPipeline.from_single_file(model, config=config, device=device, dtype=dtype)
        else:
            pipe = DragonPipeline.from_pretrained(model, device=device, dtype=dtype)
        pipe.enable_vae_tiling(vae_tiling)
    except (ValueError, TypeError, FileNotFoundError) as e:
        raise InputError(f"--model/--device/--dtype: {e}") from e
    if ip_adapter is not None:
        try:
            pipe.load_ip_adapter(ip_adapter, image_encoder)
        except (ValueError, TypeError, FileNotFoundError) as e:
            raise InputError(f"--ip-adapter/--image-encoder: {e}") from e
    if channels_last:
        pipe.enable_channels_last()
    if gradient_checkpointing:
        pipe.enable_gradient_checkpointing()
    if compile_unet:
        pipe.enable_compile()
    return pipe


@dataclass
class Loaded:
    """The pipeline a command loaded from its `model_options`, the threads it runs on, and the load time."""

    pipe: object
    threads: int
    seconds: float


def open_model(opts: dict, model: str | None = None) -> Loaded:
    """The one model loader of the commands: threads (--threads, else the idle cores), then the model given by
    `model_options` (or `model`, e.g. the one a sidecar names), timed."""
    from .options import available_threads

    threads = opts["threads"] or available_threads()[0]
    start = time.perf_counter()
    pipe = load_pipeline(model or opts["model"], opts["config"], opts["device"], opts["dtype"], threads,
                         opts["vae_tiling"], opts.get("ip_adapter"), opts.get("image_encoder"),
                         opts.get("compile_unet", False), opts.get("channels_last", False),
                         opts.get("gradient_checkpointing", False))
    apply_loras(pipe, opts.get("loras") or (), opts.get("fuse_lora", False))
    return Loaded(pipe, threads, time.perf_counter() - start)


def apply_loras(pipe, loras, fuse: bool = False) -> None:
    """Load the --lora (file, scale) pairs onto the model (fused into its weights with --fuse-lora); a file that
    does not fit it is a usage error."""
    for path, scale in loras:
        try:
            pipe.load_lora_weights(path, scale=scale)
        except (ValueError, TypeError) as e:
            raise InputError(f"--lora {path}: {str(e).removeprefix('lora: ')}") from e
    if fuse and loras:
        pipe.fuse_lora(permanent=True)  # a command never changes its LoRAs: no peft wrappers left to call


class StagedFiles:
    """Files being written under their temporary names (see `staged_files`)."""

    def __init__(self):
        self.staged: list[tuple[Path, Path]] = []  # (temporary file, path)

    def add(self, path: Path, write) -> None:
        """`write(tmp)` the file that is to become `path`."""
        path = Path(path)
        tmp = temp_path(path)
        self.staged.append((tmp, path))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write(tmp)
        except OSError as e:
            raise InputError(f"cannot write {path} ({e.strerror or e})") from e


@contextlib.contextmanager
def staged_files():
    """`with staged_files() as files: files.add(path, write)...`: each file is written as a hidden temporary file
    beside its path, and once the block has written them all, they are renamed into place in the order given (a
    signal waits until the last one is there). So an existing file is replaced only once every new file is
    written, and an interrupted or failed write leaves no temporary file and changes nothing. On a failure
    among the renames (rare: the file system went away), the new files that replaced nothing are removed again;
    a file that existed is never removed. A write error names the path, never the temporary file (exit code 2)."""
    files = StagedFiles()
    placed: list[tuple[Path, bool]] = []  # (path, whether a file was there before)
    try:
        yield files
        signals.check()  # a signal whose exception was dropped while the files were written: put none in place
        with signals.deferred():
            for tmp, path in files.staged:
                try:
                    existed = path.exists()
                    os.replace(tmp, path)
                except OSError as e:
                    raise InputError(f"cannot write {path} ({e.strerror or e})") from e
                placed.append((path, existed))
    except BaseException:
        for tmp, _ in files.staged:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        for path, existed in placed:
            if not existed:
                with contextlib.suppress(OSError):
                    path.unlink()
        raise


def atomic_write(path: Path, write) -> None:
    """`write(tmp)` a temporary file beside `path`, then rename it to `path` (`staged_files` with one file): an
    interrupted run never leaves a half-written output."""
    with staged_files() as files:
        files.add(path, write)


def image_writer(image, path: Path):
    """`write(tmp)` saving `image` in the format of `path`'s suffix."""
    return lambda tmp: image.save(tmp, format=IMAGE_SUFFIXES[Path(path).suffix.lower()])


def json_writer(data: dict):
    return lambda tmp: tmp.write_text(json.dumps(data, indent=1))


def save_image(image, path: Path) -> None:
    atomic_write(path, image_writer(image, path))


def save_json(data: dict, path: Path) -> None:
    atomic_write(path, json_writer(data))


def image_key(job: Job) -> str:
    """Edits of one image file form one group (one inversion; on Ray, one worker)."""
    image = job.spec.image
    return str(Path(image).resolve()) if isinstance(image, (str, os.PathLike)) else f"job:{job.label}"


def groups(jobs: list[Job]) -> list[list[int]]:
    """Positions of the jobs grouped by image file, groups in the order of their first job."""
    by_key: dict[str, list[int]] = {}
    for k, job in enumerate(jobs):
        by_key.setdefault(image_key(job), []).append(k)
    return list(by_key.values())


def shared_inversions(pipe, jobs: list[Job]) -> dict[int, object]:
    """An inversion per set of two or more edits of one image with one prompt, step count and resolution:
    {position in jobs: Inversion}. Only one-image tasks share one: their edit of a reused inversion is the same
    image bit for bit; a two-image task (appearance, paste) would invert its base apart from its reference, equal
    only to fp32 rounding, and a task that edits a crop of the photo (face) inverts its own crop."""
    from ..tasks import TASKS

    keys: dict[tuple, list[int]] = {}
    for k, job in enumerate(jobs):
        spec = job.spec
        info = TASKS[spec.task]
        if not isinstance(spec.image, (str, os.PathLike)) or info.frame is not None or info.images != 1:
            continue
        resolved = spec.resolved(pipe.recommended_settings, None, pipe.default_max_resolution)
        key = (image_key(job), resolved.prompt, resolved.num_inference_steps, resolved.max_resolution)
        keys.setdefault(key, []).append(k)
    out = {}
    for (_, prompt, steps, resolution), members in keys.items():
        if len(members) < 2:
            continue
        inversion = pipe.invert(jobs[members[0]].spec.image, prompt=prompt, max_resolution=resolution,
                                num_inference_steps=steps, progress=False)
        out.update({k: inversion for k in members})
    return out


def with_shared_inversions(pipe, jobs: list[Job]):
    """(job, its shared inversion or None), grouped by image file: each image with several edits is inverted
    once, and only one image's inversions are held at a time (at 512 px an SD1.5 inversion's bank is GBs). If that
    inversion fails, each edit of the group runs on its own and reports its own error."""
    for members in groups(jobs):
        group = [jobs[k] for k in members]
        try:
            inversions = shared_inversions(pipe, group)
        except Exception:  # noqa: BLE001 (each edit then inverts on its own, and says what is wrong)
            inversions = {}
        for k, job in enumerate(group):
            yield job, inversions.get(k)
        del inversions


def _written_fields(job: Job) -> dict:
    """{field: image} for the spec's fields naming a file the job writes (`Job.writes`): the edit reads them from
    memory."""
    images = {str(path): image for path, image in job.writes}
    return {name: images[value] for name, value in job.spec.params.sources()
            if isinstance(value, str) and value in images}


def execute(pipe, job: Job, *, working_size: bool, preview: bool, quiet: bool, threads: int,
            load_seconds: float = 0.0, inversion=None, extra: dict | None = None) -> dict:
    """Run one job: edit, save the image (composited at the input's size unless working_size), sidecar, preview.
    `inversion`: the job's image already inverted by this pipeline with the job's prompt, steps and resolution
    (several edits of one image share it; the result is the same); `extra`: sidecar fields set by the caller (a
    Ray worker's driver command). Returns the sidecar."""
    from ..output import full_resolution, preview as preview_sheet
    from ..provenance import build_sidecar

    signals.check()  # a signal whose exception was dropped (in a finalizer) stops the run before each edit
    from_memory = _written_fields(job)
    spec = replace(job.spec, **from_memory, image=job.spec.image if inversion is None else inversion)
    if job.plan is not None and not from_memory and inversion is None and pipe.takes_plan(job.plan):
        spec = job.plan  # the pre-check's plan: the edit does not plan it again
    result = pipe.edit(spec, progress=not quiet, callback_on_step_end=lambda *_: signals.check())
    # the sidecar names the files, not the in-memory inversion and images
    result.spec = replace(result.spec, image=job.spec.image,
                          **{name: getattr(job.spec.params, name) for name in from_memory})
    start = time.perf_counter()
    image = result.image if working_size else full_resolution(result, job.spec.image)
    # Every file is written, then all are put in place, the sidecar last: an output with its sidecar is a finished
    # edit (batch resume relies on it), and a failed or interrupted edit leaves the files that were there.
    with staged_files() as files:
        for path, written in job.writes:
            files.add(path, image_writer(written, path))
        files.add(job.output, image_writer(image, job.output))
        if preview:
            files.add(job.preview, image_writer(preview_sheet(result, image), job.preview))  # shows what was saved
        seconds = {"load": load_seconds, **result.timings, "save": time.perf_counter() - start,
                   "edit": result.seconds}
        sidecar = build_sidecar(result, pipe, sidecar=job.sidecar, output=job.output,
                                full_resolution=not working_size, seconds=seconds, threads=threads, extra=extra)
        sidecar["output"]["size"] = list(image.size)
        files.add(job.sidecar, json_writer(sidecar))
    if not quiet:
        how = "working size" if working_size else f"input size, edited area from {result.size[0]}x{result.size[1]}"
        flags = "".join(f"\n  note: {f}" for f in result.flags)
        click.echo(f"{job.label}: wrote {job.output} ({image.size[0]}x{image.size[1]}, {how}) in "
                   f"{result.seconds:.1f} s; sidecar {job.sidecar.name}{flags}")
    return sidecar
