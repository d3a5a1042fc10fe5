"""Sidecars: a JSON file beside each output that says how it was made, and re-runs it.

    {"dragondiff": "0.1.0", "spec": {...resolved EditSpec, paths relative to the sidecar...},
     "model": {"id": ..., "sha256": ... or "revision": ...}, "backbone": {"name": ..., "prediction_type": ...},
     "versions": {...}, "device": ..., "dtype": ...,
     "threads": ..., "cpu_kernels": "AVX2" (torch's CPU kernels in force; null on CUDA),
     "cpu_isa": "AVX512" (the CPU's own widest ISA; null on CUDA),
     "seconds": {"load": ..., "inversion": ..., "sampling": ..., "decode": ..., "save": ...},
     "output": {"file": ..., "size": [w, h], "working_size": [w, h], "full_resolution": true}}

`dragondiff run sidecar.json` reads `spec` back (relative paths against the sidecar's folder) and uses `model.id`
unless --model is given.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

from .spec import SOURCE_FIELDS
from .validate import shown
from .weights import file_hash, folder_hash

SIDECAR_KEY = "dragondiff"


def package_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("dragondiff", "torch", "diffusers", "transformers", "numpy", "pillow"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def fingerprint(model_id: str | None, path: Path | None = None) -> dict:
    """{"id": ...} plus a sha256 of the weight files for local models, or the hub snapshot's revision. `path` is
    the folder or file the model loads from (found from the id when not given), so a model is fingerprinted the
    same way before and after loading it."""
    out = {"id": model_id}
    if path is None and model_id is not None:
        from .loading import resolve_source

        try:
            source, _ = resolve_source(model_id)
        except ValueError:
            source = model_id
        path = Path(source) if Path(source).exists() else None
    if path is not None and Path(path).is_file():
        out["sha256"] = file_hash([Path(path)])
    elif path is not None and Path(path).is_dir():
        out["sha256"] = folder_hash(path)
    elif model_id:
        try:  # a hub id: the cached snapshot's folder name is the commit
            from huggingface_hub import snapshot_download

            out["revision"] = Path(snapshot_download(model_id, local_files_only=True)).name
        except Exception:  # noqa: BLE001 (not cached as a snapshot: no revision to report)
            out["revision"] = None
    return out


def model_fingerprint(pipe) -> dict:
    """The loaded pipeline's `fingerprint`, with its image-prompt adapter (file, sha256, variant, tokens, image
    encoder) when one is loaded."""
    out = fingerprint(pipe.model_id, pipe.model_path)
    prompt = pipe.backbone.image_prompt
    if prompt is not None:
        out["ip_adapter"] = prompt.record()
    loras = pipe.loras
    if loras:  # file, path, sha256, scale, adapter name, fused: what `run` re-applies
        out["loras"] = loras
    return out


def sidecar_model(data: dict) -> dict | None:
    """A sidecar's `model` record ({"id": ..., "sha256"/"revision": ...}), checked; None when it names none."""
    model = data.get("model")
    if model is None:
        return None
    if not isinstance(model, dict):
        raise ValueError(f'model: expected an object like {{"id": ..., "sha256": ...}}, got {shown(model)}')
    if model.get("id") is not None and not isinstance(model["id"], str):
        raise ValueError(f"model.id: expected a model id or path (a string), got {shown(model['id'])}")
    for key in ("sha256", "revision"):
        if model.get(key) is not None and not isinstance(model[key], str):
            raise ValueError(f"model.{key}: expected a string, got {shown(model[key])}")
    adapter = model.get("ip_adapter")
    if adapter is not None and (not isinstance(adapter, dict) or not isinstance(adapter.get("file"), str)):
        raise ValueError(f'model.ip_adapter: expected an object like {{"file": ..., "sha256": ...}}, got '
                         f"{shown(adapter)}")
    for key in ("sha256", "image_encoder", "image_encoder_sha256"):
        if adapter is not None and adapter.get(key) is not None and not isinstance(adapter[key], str):
            raise ValueError(f"model.ip_adapter.{key}: expected a string, got {shown(adapter[key])}")
    loras = model.get("loras", [])
    if not isinstance(loras, list) or not all(
            isinstance(r, dict) and isinstance(r.get("path"), (str, type(None))) and isinstance(r.get("scale"), (int, float))
            and not isinstance(r.get("scale"), bool) for r in loras):
        raise ValueError(f'model.loras: expected a list of objects like {{"path": ..., "sha256": ..., "scale": 1.0}}, '
                         f"got {shown(loras)}")
    return model if model.get("id") is not None else None


def fingerprint_change(recorded: dict, model: str) -> str | None:
    """What differs between the weights a sidecar recorded and those `model` has now (None: the same, or nothing
    to compare)."""
    now = fingerprint(model)
    for key in ("sha256", "revision"):
        if recorded.get(key) and now.get(key) and recorded[key] != now[key]:
            return f"{key} {recorded[key][:12]}… recorded, {now[key][:12]}… now"
    return None


def spec_for_sidecar(spec, sidecar: Path) -> dict:
    """The spec as JSON, with file paths relative to the sidecar's folder (so the folder can move)."""
    data = spec.to_dict()
    for name in SOURCE_FIELDS:
        value = data.get(name)
        if isinstance(value, str) and not value.startswith("<in-memory"):
            data[name] = os.path.relpath(os.path.abspath(value), os.path.abspath(sidecar.parent))
    return data


def build_sidecar(result, pipe, *, sidecar: Path, output: Path, full_resolution: bool, seconds: dict,
                  threads: int, extra: dict | None = None) -> dict:
    return {
        SIDECAR_KEY: package_versions()["dragondiff"],
        "spec": spec_for_sidecar(result.spec, sidecar),
        "model": model_fingerprint(pipe),
        "backbone": pipe.backbone.describe(),  # SD1.x / SD2.x / SDXL and what its UNet predicts
        "versions": package_versions(),
        "device": str(pipe.device),
        "dtype": str(pipe.dtype).replace("torch.", ""),
        "threads": threads,
        "vae_tiling": pipe.backbone.vae_tiling,  # changes pixels at tile seams
        "channels_last": pipe.backbone.channels_last,  # --channels-last: about 1 grey level from the default
        # --gradient-checkpointing: recomputes the guided pass's activations; the same numbers, less memory
        "gradient_checkpointing": bool(getattr(pipe.backbone.denoiser, "is_gradient_checkpointing", False)),
        "platform": f"{platform.system()} {platform.machine()}",
        "cpu_kernels": cpu_kernels() if pipe.device.type == "cpu" else None,  # fp32 pixels depend on them
        "cpu_isa": cpu_isa() if pipe.device.type == "cpu" else None,  # ... and on the hardware beneath them
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "flags": list(result.flags),
        "output": {"file": os.path.relpath(os.path.abspath(output), os.path.abspath(sidecar.parent)),
                   "full_resolution": full_resolution, "working_size": list(result.size)},
        **(extra or {}),
    }


def cpu_kernels() -> str:
    """torch's vector ISA in force ("AVX2", "AVX512", ...; ATEN_CPU_CAPABILITY can lower it): its kernels round
    differently, so a CPU edit re-run with other kernels may differ by a grey level in a few pixels (measured: 2 of
    16,384, AVX-512 vs AVX2)."""
    import torch

    return torch.backends.cpu.get_cpu_capability()


def cpu_isa() -> str:
    """The widest vector ISA the CPU itself has, whatever kernels are pinned: pinning another CPU's kernels does not
    make its pixels (oneDNN and MKL still pick code paths by the hardware; measured on an AVX-512 CPU running an
    AVX2 sidecar with ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2: 1 pixel of 16,384 one grey level off)."""
    import torch

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return cpu_kernels()
    for name, probe in (("AVX512", "_is_avx512_supported"), ("AVX2", "_is_avx2_supported")):
        if getattr(torch.cpu, probe, lambda: False)():
            return name
    return "DEFAULT"


# How to make this CPU run the kernels a sidecar recorded (torch's ATen kernels, and oneDNN's convolutions and
# matrix products). On a CPU of the recorded kind (cpu_isa) this gives the recorded pixels bit for bit; on other
# hardware it brings them closer, not always equal (see cpu_isa).
KERNEL_ENV = {"AVX2": "ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2", "DEFAULT": "ATEN_CPU_CAPABILITY=default"}


def kernels_change(data: dict) -> str | None:
    """A note when a CPU sidecar was made with other CPU kernels, or on a CPU of another kind, than this one runs
    (None: the same, not recorded, or not a CPU edit), saying how to run the recorded kernels where that is known
    and what that promises."""
    recorded = data.get("cpu_kernels")
    if not isinstance(recorded, str) or not str(data.get("device", "")).startswith("cpu"):
        return None
    now, made_on, here = cpu_kernels(), data.get("cpu_isa"), cpu_isa()
    other_hardware = isinstance(made_on, str) and made_on != here
    if recorded == now and not other_hardware:
        return None
    if recorded == now:
        return (f"made on a CPU with {made_on}, this one has {here}: with the same kernels ({now}) pixels may still "
                f"differ by a grey level here and there")
    if recorded not in KERNEL_ENV:
        how = ""
    elif made_on == here:
        how = f"; for the same pixels run it with {KERNEL_ENV[recorded]} before the command"
    else:  # not recorded (older sidecars) or another kind of CPU: the pin narrows the gap, it may not close it
        how = (f"; {KERNEL_ENV[recorded]} before the command runs the recorded kernels (the same pixels on a CPU "
               f"with {made_on or recorded}, closer elsewhere)")
    return (f"made with torch's {recorded} CPU kernels, this CPU runs {now}: pixels may differ by a grey level "
            f"here and there{how}")


def is_sidecar(data) -> bool:
    return isinstance(data, dict) and SIDECAR_KEY in data and "spec" in data

