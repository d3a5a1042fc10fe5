"""`dragondiff bench memory`: the GPU memory one edit needs at full size, estimated without a GPU and without weights.

    dragondiff bench memory --model sdxl-shaped                      # SDXL at 1024 px, fp16, move (one image)
    dragondiff bench memory --model sdxl-shaped --images 2 --bank-device cpu
    dragondiff bench memory --model sd15-shaped --size 768           # checks the method against the H100 run
    dragondiff bench memory --model tiny-sdxl --size 256 --steps 2 --check   # ... and against a real run here
    dragondiff bench memory --model flux-shaped --dtype bfloat16 --bank-device cpu --gradient-checkpointing
    dragondiff bench memory --model sd35m-shaped                      # SD3.5-Medium at 1024 px

Any backbone: the UNet families (SD1.x, SD2.x, SDXL) and the flow transformers (SD3/SD3.5, FLUX.1); the denoiser's
configuration picks the class and the step rule the model time, as the pipeline does. The full-size random model
(`tiny.SHAPED`) is built on fake tensors (torch's FakeTensorMode: shapes, dtypes and devices, no storage), and each
kind of pass an edit makes runs through the backbone as the sampler calls it while a dispatch mode counts the bytes
of the tensors alive: the text encoders, VAE encode, an inversion pass (batch = images), a CFG pass (batch 2, or 1
for FLUX.1-dev without true CFG), a reference feature pass, a guidance evaluation (feature pass with gradient, then
both energy gradients through one batched backward, as on CUDA; with --gradient-checkpointing the denoiser's
checkpointing on) and the VAE decode. The estimate of the edit's peak is

    weights + bank and cached reference features (when they live on the GPU) + latents kept + the largest pass

since the passes run one after another and only the weights, the bank and the latents outlive them. It leaves out
allocator fragmentation and the CUDA context (a few hundred MB), and the attention kernels' workspace: the fake
CPU kernels are the memory-efficient ones, as PyTorch's CUDA SDPA picks for fp16. Nothing runs on a GPU and nothing
is timed; it takes about a minute of one CPU core for SDXL.
"""

from __future__ import annotations

import argparse
import json
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

GIB = 2**30


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages made inside the block that are still alive, and their peak.

    An output that shares its storage with an input (a view such as a weight's transpose inside F.linear, or an
    in-place result) is no new memory: it is not counted. (Counting such views once counted every linear layer's
    weight the pass touched as activation memory.)"""

    def __init__(self):
        super().__init__()
        self.current = self.peak = 0
        self._seen: weakref.WeakSet = weakref.WeakSet()

    def _free(self, n: int) -> None:
        self.current -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage._cdata not in inputs and storage not in self._seen:
                    self._seen.add(storage)
                    n = storage.nbytes()
                    self.current += n
                    weakref.finalize(storage, self._free, n)
        self.peak = max(self.peak, self.current)
        return out


def _peak(fn) -> int:
    meter = LiveBytes()
    with meter:
        fn()
    return meter.peak


def _components(model: str, dtype: torch.dtype) -> dict:
    """The components of `model` (a SHAPED name or "tiny-<layout>"), built in `dtype` inside the caller's fake mode."""
    from ..tiny import SHAPED, build_shaped_components, build_tiny_components, default_dtype

    if model in SHAPED:
        return build_shaped_components(model, dtype=dtype)
    with default_dtype(dtype):  # fake parameters cannot be cast after they are made
        return build_tiny_components(0, model.removeprefix("tiny-"))


def model_time(rule) -> int | float:
    """A mid-trajectory model time in the rule's units: DDIM's integer t, flow matching's σ·1000 (σ = 0.5)."""
    return int(rule.config.num_train_timesteps) // 2 if rule.NAME == "ddim" else 500.0


def _bytes(module: torch.nn.Module, dtype: torch.dtype, wanted: torch.dtype) -> int:
    """Parameters and buffers of a module as the pipeline holds them: floating ones cast to `wanted` (the pipeline's
    `to` casts buffers too: SD3's 226 M-value position table), the others as they are."""
    size = torch.finfo(wanted).bits // 8
    return sum(t.numel() * (size if t.is_floating_point() else t.element_size())
               for t in (*module.parameters(), *module.buffers()))


def fake_backbone(model: str, dtype: torch.dtype):
    """(backbone, step rule) of `model` as the pipeline sets them up, in eval mode without gradients on the weights;
    call inside a FakeTensorMode. The denoiser's configuration picks the class (a "unet" or a "transformer")."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from ..loading import backbone_class
    from ..steps import RULES

    parts = _components(model, dtype)
    scheduler = parts.pop("scheduler")
    scheduler_config = {**scheduler.config, "_class_name": type(scheduler).__name__}
    denoiser = parts.pop("unet") if "unet" in parts else parts.pop("transformer")
    cls = backbone_class(denoiser.config, scheduler_config)
    bb = cls.from_components(denoiser, **parts)
    for module in bb.modules:
        module.eval().requires_grad_(False)
    with unset_fake_temporarily():  # the rule reads its scheduler's real tables
        rule = RULES[cls.RULE](scheduler_config)
        bb.set_rule(rule)  # as the pipeline: a DDIM backbone learns its prediction type and ᾱ table
    return bb, rule


def default_cfg_batch(cls) -> int:
    """The batch of a CFG pass with the family's default settings: 1 for a guidance-distilled model without true
    CFG (FLUX.1-dev's default, guidance_scale 1), else 2 (unconditional and conditional)."""
    from ..loading import model_defaults

    scale = model_defaults(cls.NAME)["settings"].get("move", {}).get("guidance_scale")
    return 1 if scale == 1 and getattr(cls, "EMBEDDED_GUIDANCE", False) else 2


def estimate(model: str, size: int, dtype: torch.dtype = torch.float16, images: int = 1, steps: int = 50,
             bank_device: str = "cuda", gradient_checkpointing: bool = False) -> dict:
    """Bytes of an edit's parts and of its estimated peak with the `official` preset (see the module docstring), for
    any backbone: the denoiser's configuration picks the class (a "unet" or a "transformer"), the step rule its
    model time. `gradient_checkpointing`: the guidance pass with the denoiser's checkpointing on
    (`DragonPipeline.enable_gradient_checkpointing`)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ..features import resize_features
    from ..inputs import working_size
    from ..presets import get_preset

    official = get_preset("official")  # its guided steps' reference features are cached: 20 of 50
    guided_steps = sum(official.is_guided(i * 50 // steps) for i in range(steps))
    with FakeTensorMode(allow_non_fake_inputs=True):
        bb, rule = fake_backbone(model, dtype)
        cls = type(bb)
        if gradient_checkpointing:
            bb.denoiser.enable_gradient_checkpointing()
        h, w = working_size(size, size, size)
        latent_hw = (h // bb.vae_factor, w // bb.vae_factor)
        names = {id(getattr(bb, a)): a for a in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3")
                 if getattr(bb, a, None) is not None}
        names[id(bb.denoiser)] = "denoiser"
        weights_by_part: dict[str, int] = {}
        for k, module in enumerate(bb.modules):
            name = names.get(id(module), f"module_{k}")
            weights_by_part[name] = _bytes(module, dtype, bb.module_dtype(module, dtype))
        weights = sum(weights_by_part.values())
        cfg_batch = default_cfg_batch(cls)
        text_meter = LiveBytes()
        with torch.no_grad(), text_meter:
            cond = bb.condition([""] * images, (h, w))
        with torch.no_grad():
            pair = type(cond).cat([bb.unconditional((h, w)), cond[:1]]) if cfg_batch == 2 else cond[:1]
        z = torch.zeros(images, bb.latent_channels, *latent_hw)
        t = model_time(rule)

        def encode():
            with torch.no_grad():
                bb.encode_image(torch.zeros(images, 3, h, w))

        def inversion():
            with torch.no_grad():
                bb.predict(z, t, cond)

        def cfg():
            with torch.no_grad():
                bb.predict(torch.cat([z[:1]] * cfg_batch), t, pair)

        def reference():
            with torch.no_grad():
                bb.features(z, t, cond)

        grid = (int(bb.feature_factor * latent_hw[0]), int(bb.feature_factor * latent_hw[1]))

        def guidance():
            # As sampler.guidance with the move task's energies: the native reference features (kept from the
            # reference pass), both maps nearest-resized to the fp32 feature grid (the references twice: as they
            # are and the scaled copy), cosine terms over every cell (an upper bound: tasks select some cells).
            with torch.no_grad():
                refs = bb.features(z[:1], t, cond[:1])
            latent = z[:1].clone().requires_grad_(True)
            with torch.enable_grad():
                gen = resize_features(bb.features(latent, t, cond[:1]), grid)
                terms = []
                for ref in (resize_features(refs, grid), resize_features(refs, grid)):
                    sims = [F.cosine_similarity(g.flatten(2), r.flatten(2), dim=1).mean() for g, r in zip(gen, ref)]
                    terms.append(sum(1.0 / (1.0 + 4.0 * s) for s in sims))
                torch.autograd.grad(torch.stack(terms), latent, grad_outputs=torch.eye(2), is_grads_batched=True)

        def decode():
            with torch.no_grad():
                bb.vae.decode(z[:1].to(bb.vae.dtype))

        passes = {"text": text_meter.peak}
        passes.update({name: _peak(fn) for name, fn in (
            ("encode", encode), ("inversion", inversion), ("cfg", cfg), ("reference_features", reference),
            ("guidance", guidance), ("decode", decode))})
        bank = bb.bank_bytes(latent_hw, steps, images)
        with torch.no_grad():
            features = bb.features(z[:1], t, cond[:1])
        # the base image's reference features, cached beside the bank for each guided step
        cache = guided_steps * sum(f.numel() * f.element_size() for f in features)
    latents = (steps + 1) * images * bb.latent_channels * latent_hw[0] * latent_hw[1] * 4  # fp32 inverted latents
    resident = weights + (bank + cache if bank_device != "cpu" else 0) + latents
    return {"model": model, "backbone": cls.NAME, "size_hw": [h, w], "dtype": str(dtype).replace("torch.", ""),
            "images": images, "steps": steps, "bank_device": bank_device,
            "gradient_checkpointing": gradient_checkpointing, "cfg_batch": cfg_batch, "model_time": t,
            "weights_bytes": weights, "weights_by_part_bytes": weights_by_part,
            "bank_bytes": bank, "bank_bytes_per_step": bank // steps, "feature_cache_bytes": cache,
            "latents_bytes": latents,
            "pass_peak_bytes": passes, "peak_estimate_bytes": resident + max(passes.values()),
            "largest_pass": max(passes, key=passes.get)}


def measure(layout: str, size: int, steps: int, images: int = 1, gradient_checkpointing: bool = False) -> int:
    """Peak bytes of tensors alive during a real `official` edit of a tiny model (fp32, CPU, bank on the CPU):
    move for one image, paste for two."""
    from ..bench.speed import scene
    from ..tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(0, layout, device="cpu", dtype=torch.float32)
    pipe.enable_gradient_checkpointing(gradient_checkpointing)
    example = scene(size)
    meter = LiveBytes()
    common = dict(max_resolution=size, num_inference_steps=steps, progress=False, preset="official",
                  bank_device="cpu")
    with meter:
        if images == 1:
            pipe.move(example.image, example.object, offset=(size // 8, 0), **common)
        else:
            pipe.paste(example.image, example.image, example.object, offset=(size // 8, 0), **common)
    return meter.peak


def main(argv=None) -> int:
    from ..tiny import LAYOUTS, SHAPED

    parser = argparse.ArgumentParser(prog="dragondiff bench memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sdxl-shaped", choices=sorted(SHAPED) + [f"tiny-{x}" for x in LAYOUTS],
                        help="a full-size random model, or a tiny one (to compare with a real run)")
    parser.add_argument("--size", type=int, default=None, help="working resolution (default: the model's own)")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--images", type=int, default=1, choices=[1, 2],
                        help="images inverted: 1 (move, drag, face) or 2 (appearance, paste)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--bank-device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="the guidance pass with the denoiser's gradient checkpointing on "
                             "(DragonPipeline.enable_gradient_checkpointing, --gradient-checkpointing)")
    parser.add_argument("--check", action="store_true",
                        help="tiny models: also run the official move for real (CPU, fp32; the estimate then uses "
                             "fp32 too) and print what it held")
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default: print only)")
    args = parser.parse_args(argv)
    if args.check and args.model in SHAPED:
        parser.error("--check runs the edit for real: only with a tiny-* model")
    if args.check:
        args.dtype = "float32"  # as the real run on the CPU
    torch.set_num_threads(1)
    size = args.size or SHAPED.get(args.model, 128)
    result = estimate(args.model, size, getattr(torch, args.dtype), args.images, args.steps, args.bank_device,
                      args.gradient_checkpointing)
    for name, n in result["weights_by_part_bytes"].items():
        print(f"  weights {name:15s} {n / GIB:8.2f} GiB")
    for key in ("weights_bytes", "bank_bytes", "bank_bytes_per_step", "feature_cache_bytes", "latents_bytes",
                "peak_estimate_bytes"):
        print(f"{key.removesuffix('_bytes'):20s} {result[key] / GIB:8.2f} GiB")
    for name, n in result["pass_peak_bytes"].items():
        print(f"  pass {name:18s} {n / GIB:8.2f} GiB")
    if args.check:
        result["measured_bytes"] = measure(args.model.removeprefix("tiny-"), size, args.steps, args.images,
                                           args.gradient_checkpointing)
        # the real run keeps its bank and cached features in CPU memory, which the meter counts
        predicted = (result["peak_estimate_bytes"] - result["weights_bytes"]
                     + (result["bank_bytes"] + result["feature_cache_bytes"] if args.bank_device == "cpu" else 0))
        print(f"check: held beyond the weights {result['measured_bytes'] / 2**20:.1f} MiB measured, "
              f"{predicted / 2**20:.1f} MiB predicted")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return 0
