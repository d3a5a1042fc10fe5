"""`dragondiff bench speed`: seconds, UNet passes and peak memory per edit, per task and preset.

    dragondiff bench speed                                   # tiny random model, 128 px, every task and preset
    dragondiff bench speed --model bundled                   # the shapes model at 128 px
    dragondiff bench speed --model sd15-shaped --size 512 --device cuda --dtype float16
    dragondiff bench speed --model sdxl-shaped --device cuda --tasks move --presets official   # 1024 px, SDXL's sizes
    dragondiff bench speed --image-prompt random             # the same with a random 64-token image prompt
    dragondiff bench speed --model flux-shaped --estimate    # FLOPs per edit at 1024 px on fake tensors, no run

For each preset and task it runs one image three ways: `pipe.invert` + a first edit (= the cost of a plain edit,
which inverts inside the call), then a later edit of the same inversion (no inversion; the base image's reference
features come from the inversion's cache). Reported per edit: seconds per phase (encode, inversion, cfg,
reference_features, guidance, time_travel, decode), pass counts, peak memory (RSS on CPU, sampled every 5 ms;
`torch.cuda.max_memory_allocated` on CUDA) and the time in forward-equivalents (FE): seconds over one batch-1 UNet
forward measured in the same process. The `official code` column estimates what the official implementation costs
for the same schedule: its pass counts (reference-spec §10: no cached features, two backward passes per guidance
evaluation, the discarded last time-travel pass; equal to §10's table at 50 steps) times the per-pass seconds
measured here, plus our own encode and decode seconds (VAE and text encoder, the same work in both). It leaves
out the official code's other overheads (energies, mask work, its bank copies), so it flatters the official code. Run on an otherwise idle machine: it prints and saves numbers, nothing asserts them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from ..inputs import working_size
from ..presets import PRESETS, get_preset
from ..sampler import Stopwatch
from ..spec import EditSpec
from ..tasks.base import ExampleScene
from .cases import BENCH_CASES

PHASES = ("encode", "inversion", "cfg", "reference_features", "guidance", "time_travel", "decode")


def scene(size: int) -> ExampleScene:
    """A disc (the object) and a square (the other object) on green at `size` px, and a drag region."""
    k = size / 128
    yy, xx = np.mgrid[0:size, 0:size]
    img = np.zeros((size, size, 3), np.uint8)
    img[...] = (40, 160, 70)
    disc = (xx - 40 * k) ** 2 + (yy - 64 * k) ** 2 <= (18 * k) ** 2
    square = (abs(xx - 96 * k) <= 14 * k) & (abs(yy - 30 * k) <= 14 * k)
    img[disc], img[square] = (220, 40, 40), (40, 70, 220)
    drag = np.zeros_like(disc)
    drag[int(40 * k) : int(100 * k), int(20 * k) : int(80 * k)] = True
    return ExampleScene(image=img, object=disc, other=square, region=drag, size=size)


# ------------------------------------------------------------------------------------------------- memory


class PeakMemory:
    """Peak memory of a block: CUDA allocator peak on a GPU, else the process's resident set (sampled)."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    @contextmanager
    def measure(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            yield
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
            return
        if not os.path.exists("/proc/self/statm"):  # not Linux: no sampling
            self.peak = 0
            yield
            return
        stop, peak = threading.Event(), [self.rss()]

        def sample():
            while not stop.wait(0.005):
                peak[0] = max(peak[0], self.rss())

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            self.peak = max(peak[0], self.rss())


# ----------------------------------------------------------------------------------------- per-pass costs


def _median_seconds(fn, device, repeats: int) -> float:
    fn()  # warm-up
    watch = Stopwatch(device)  # synchronises a CUDA device around each call
    for k in range(repeats):
        with watch.phase(str(k)):
            fn()
    return statistics.median(watch.seconds.values())


def pass_costs(pipe, latent_hw: tuple[int, int], repeats: int = 3) -> dict[str, float]:
    """Seconds of each kind of pass at this latent size (plain attention, no bank)."""
    from .memory import model_time

    bb, dev = pipe.backbone, pipe.device
    g = torch.Generator("cpu").manual_seed(0)
    z = torch.randn((1, bb.latent_channels, *latent_hw), generator=g).to(dev)
    cond = bb.condition([""], tuple(d * bb.vae_factor for d in latent_hw))
    t = model_time(pipe.rule)
    with torch.no_grad():
        full1 = _median_seconds(lambda: bb.predict(z, t, cond), dev, repeats)
        full2 = _median_seconds(lambda: bb.predict(torch.cat([z, z]), t, cond.repeat(2)), dev, repeats)
        feat = _median_seconds(lambda: bb.features(z, t, cond), dev, repeats)

    def grad_fwd():
        lat = z.clone().requires_grad_(True)
        with torch.enable_grad():
            return lat, sum(f.float().pow(2).mean() for f in bb.features(lat, t, cond))

    def grad_fwd_bwd():
        lat, e = grad_fwd()
        torch.autograd.grad(e, lat)

    feat_grad = _median_seconds(grad_fwd, dev, repeats)
    backward = max(0.0, _median_seconds(grad_fwd_bwd, dev, repeats) - feat_grad)
    return {"unet_forward_b1": full1, "unet_forward_b2": full2, "feature_forward": feat,
            "feature_forward_grad": feat_grad, "backward": backward}


def official_counts(counts: dict, preset_name: str, steps: int, n_images: int,
                    energy_terms: int = 2) -> dict[str, int]:
    """The official code's passes for the schedule our edit ran: one inversion of all images (batch n_images),
    reference features of every image at every guidance evaluation (also the repeats of a step), one backward
    per energy term, and the discarded time-travel pass after the last repeat of each repeated step."""
    preset = get_preset(preset_name)
    tt = counts["time_travel_unet"]
    if preset.time_travel_repeats > 1 and tt:
        tt += tt // (preset.time_travel_repeats - 1)
    return {"inversion_unet": steps, "cfg_unet": counts["cfg_unet"],
            "time_travel_unet": tt, "feature_nograd": counts["feature_grad"] * n_images,
            "feature_grad": counts["feature_grad"], "backward": energy_terms * counts["feature_grad"],
            "n_images": n_images}


def estimate_seconds(counts: dict, costs: dict, inversion_batch: int) -> float:
    inv = costs["unet_forward_b2"] if inversion_batch == 2 else costs["unet_forward_b1"]
    return (counts["inversion_unet"] * inv + counts["cfg_unet"] * costs["unet_forward_b2"]
            + counts["time_travel_unet"] * costs["unet_forward_b1"]
            + counts["feature_nograd"] * costs["feature_forward"]
            + counts["feature_grad"] * costs["feature_forward_grad"] + counts["backward"] * costs["backward"])


# ------------------------------------------------------------------------------------ work per edit (FLOPs)


def preset_pass_counts(preset: str, steps: int | None = None, images: int = 1, one_backward: bool = True,
                       energy_terms: int = 2) -> dict[str, int]:
    """The network passes of a first edit (inversion inside) of `images` images with `preset`, as `sampler.sample`
    makes them (`EditResult.pass_counts`'s keys), worked out from the preset without running it: every step one
    CFG call per repeat and the time-travel passes between repeats; every guided step the reference features of
    each image once and, per repeat, one feature pass with gradient and one batched backward (or one per energy
    term)."""
    p = get_preset(preset)
    n = steps or p.steps
    counts = {"inversion_unet": n, "cfg_unet": 0, "time_travel_unet": 0, "feature_nograd": 0, "feature_cached": 0,
              "feature_grad": 0, "backward": 0, "image_encoder": 0}
    for i in range(n):
        step = i * 50 // n  # the presets' 50-step grid (steps.Schedule.grid_step)
        guided = p.is_guided(step)
        repeats = p.repeats(step) if guided else 1
        counts["cfg_unet"] += repeats
        counts["time_travel_unet"] += repeats - 1
        if guided:
            counts["feature_nograd"] += images
            counts["feature_grad"] += repeats
            counts["backward"] += repeats * (1 if one_backward else energy_terms)
    return counts


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                             **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _flops(fn) -> int:
    """FLOPs of the matrix products, convolutions and attention `fn` runs (torch's FlopCounterMode; element-wise
    work is not counted). On fake CPU tensors attention runs as the CPU flash kernel, which torch's table lacks:
    counted here with its formulas for the other attention kernels."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    mapping = {aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
               aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return counter.get_total_flops()


def pass_flops(model: str, size: int, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Forward (and backward) FLOPs of each kind of pass of an edit of `model` (a `tiny.SHAPED` name or
    "tiny-<layout>") at `size` px, counted on fake tensors: no weights, nothing timed, nothing run on a GPU."""
    import torch.nn.functional as F
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ..features import resize_features
    from .memory import default_cfg_batch, fake_backbone, model_time

    with FakeTensorMode(allow_non_fake_inputs=True):
        bb, rule = fake_backbone(model, dtype)
        h, w = working_size(size, size, size)
        latent_hw = (h // bb.vae_factor, w // bb.vae_factor)
        z = torch.zeros(1, bb.latent_channels, *latent_hw)
        t = model_time(rule)
        grid = (int(bb.feature_factor * latent_hw[0]), int(bb.feature_factor * latent_hw[1]))
        with torch.no_grad():
            cond = bb.condition([""], (h, w))
            refs = bb.features(z, t, cond)
        out = {"size_hw": [h, w], "backbone": bb.NAME, "cfg_batch": default_cfg_batch(type(bb))}
        with torch.no_grad():
            out["text"] = _flops(lambda: bb.condition([""], (h, w)))
            out["encode"] = _flops(lambda: bb.encode_image(torch.zeros(1, 3, h, w)))
            out["denoiser_forward"] = _flops(lambda: bb.predict(z, t, cond))
            out["feature_forward"] = _flops(lambda: bb.features(z, t, cond))
            out["decode"] = _flops(lambda: bb.vae.decode(z.to(bb.vae.dtype)))
        latent = z.clone().requires_grad_(True)
        with torch.enable_grad():
            gen = resize_features(bb.features(latent, t, cond), grid)
            sims = [F.cosine_similarity(g.flatten(2), r.flatten(2), dim=1).mean()
                    for g, r in zip(gen, resize_features(refs, grid))]
            energy = sum(1.0 / (1.0 + 4.0 * s) for s in sims)
            # one energy term's vector-Jacobian product (the batched backward of two terms does this twice over)
            out["feature_backward"] = _flops(lambda: torch.autograd.grad(energy, latent))
    return out


def edit_flops(per_pass: dict, counts: dict, images: int = 1, energy_terms: int = 2,
               gradient_checkpointing: bool = False) -> dict[str, int]:
    """FLOPs of one edit by kind of work: `counts` (preset_pass_counts) times `per_pass` (pass_flops). Inversion
    passes carry `images` latents, CFG passes `cfg_batch`; each guided evaluation back-propagates `energy_terms`
    cotangents; with gradient checkpointing each backward pass first runs the feature forward again."""
    fwd, feat = per_pass["denoiser_forward"], per_pass["feature_forward"]
    work = {
        "text": 2 * per_pass["text"],  # the prompt and the empty prompt
        "encode": images * per_pass["encode"],
        "inversion": counts["inversion_unet"] * images * fwd,
        "cfg": counts["cfg_unet"] * per_pass["cfg_batch"] * fwd,
        "time_travel": counts["time_travel_unet"] * fwd,
        "reference_features": counts["feature_nograd"] * feat,
        "guidance_forward": counts["feature_grad"] * feat,
        "guidance_backward": counts["feature_grad"] * energy_terms * per_pass["feature_backward"],
        "recompute": counts["backward"] * feat if gradient_checkpointing else 0,
        "decode": per_pass["decode"],
    }
    return work


def estimate_work(model: str, size: int, dtype: torch.dtype = torch.bfloat16, presets=("official", "fast"),
                  gradient_checkpointing: bool = False) -> dict:
    """FLOPs per first edit (move, one image, inversion included, one batched backward as on CUDA) of each preset:
    an estimate from counted FLOPs on fake tensors, no timing. `forward_equivalents`: the edit's FLOPs over one
    batch-1 denoiser forward's."""
    per_pass = pass_flops(model, size, dtype)
    rows = {}
    for preset in presets:
        counts = preset_pass_counts(preset)
        work = edit_flops(per_pass, counts, gradient_checkpointing=gradient_checkpointing)
        total = sum(work.values())
        rows[preset] = {"steps": counts["inversion_unet"], "passes": counts, "flops_by_kind": work,
                        "flops": total, "forward_equivalents": round(total / per_pass["denoiser_forward"], 1)}
    return {"model": model, "dtype": str(dtype).replace("torch.", ""), "gradient_checkpointing":
            gradient_checkpointing, "pass_flops": per_pass, "presets": rows}


# ------------------------------------------------------------------------------------------------- models


def load_model(name: str, device, dtype):
    from ..pipeline import DragonPipeline
    from ..tiny import SHAPED, build_shaped_components, build_tiny_pipeline

    if name == "tiny":
        return build_tiny_pipeline(device=device, dtype=dtype), 128
    if name == "bundled":
        return DragonPipeline.bundled(device=device, dtype=dtype), 128
    if name in SHAPED:  # full-size random weights: SD1.5, SD2.1 (v, 768 px), SDXL (1024 px)
        return DragonPipeline(**build_shaped_components(name, device=device, dtype=dtype), device=device,
                              dtype=dtype), SHAPED[name]
    return DragonPipeline.from_pretrained(name, device=device, dtype=dtype), 512


def attach_random_image_prompt(pipe) -> str:
    """A random 64-token image prompt of the official shapes for this model: for an SD1.5-sized UNet (768-wide
    text) the official Resampler and a ViT-H/14-sized CLIP image encoder (1280 wide, 32 layers: 632 M parameters),
    for smaller models a small encoder. Returns a description for the report."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from ..image_prompt import from_state, random_state

    width = pipe.backbone.denoiser.config.cross_attention_dim
    if width >= 768:
        config = CLIPVisionConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                  num_attention_heads=16, image_size=224, patch_size=14, projection_dim=1024)
        resampler = dict(hidden=768, heads=12, depth=4)
    else:
        config = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=224, patch_size=14, projection_dim=64)
        resampler = dict(hidden=width, heads=2, depth=4)
    torch.manual_seed(0)
    encoder = CLIPVisionModelWithProjection(config)
    proj, layers = random_state(pipe.backbone.denoiser, "resampler", 64, encoder_width=config.hidden_size, **resampler)
    pipe.backbone.load_image_prompt(from_state(pipe.backbone.denoiser, proj, layers, encoder))
    return (f"random: Resampler {resampler}, 64 tokens; CLIP image encoder {config.hidden_size} wide, "
            f"{config.num_hidden_layers} layers")


def _edit(pipe, case: str, image, preset: str, size: int, steps: int | None, example: ExampleScene,
          bank_device=None):
    """Case `case`'s example edit of the scene; `image` is its image or an Inversion made at this size and step
    count (equal values are accepted)."""
    info, declared = BENCH_CASES[case]
    spec = EditSpec(task=info.name, image=image, **declared.example(example), preset=preset, num_inference_steps=steps,
                    max_resolution=size)
    return pipe.edit(spec, progress=False, bank_device=bank_device)


def run(pipe, size: int, tasks, presets, steps: int | None, repeats: int = 3, bank_device=None) -> dict:
    example = scene(size)
    dev = pipe.device
    pipe.precise_timings = True
    mem = PeakMemory(dev)
    latent_hw = tuple(d // pipe.backbone.vae_factor for d in working_size(size, size, size))
    warm = time.perf_counter()  # with --compile, the cold start: compiling every signature the edits use
    costs = pass_costs(pipe, latent_hw, repeats)
    fe = costs["unet_forward_b1"]
    for preset in presets:  # warm-up of the whole path (each preset's signatures)
        _edit(pipe, next(iter(BENCH_CASES)), example.image, preset, size, 2, example)
    warmup_s = time.perf_counter() - warm
    rows = []
    for preset in presets:
        n = steps or PRESETS[preset].steps
        for task in tasks:
            n_images = BENCH_CASES[task][0].images
            watch = Stopwatch(dev)
            with mem.measure():
                with watch.phase("invert"):
                    inv = pipe.invert(example.image, max_resolution=size, num_inference_steps=n, progress=False,
                                      bank_device=bank_device or dev)
                first = _edit(pipe, task, inv, preset, size, n, example, bank_device)
            invert_s = watch.seconds["invert"]
            first_peak = mem.peak
            with mem.measure():
                later = _edit(pipe, task, inv, preset, size, n, example, bank_device)
            later_peak = mem.peak
            # the invert call's passes belong to the first edit
            first_counts = dict(first.pass_counts, inversion_unet=n + first.pass_counts["inversion_unet"])
            official = official_counts(first_counts, preset, n, n_images)
            # plus the work both implementations share outside the UNet passes (VAE, text encoder)
            shared = first.phases.get("encode", 0.0) + first.phases.get("decode", 0.0)
            official_s = estimate_seconds(official, costs, n_images) + shared
            first_s = invert_s + first.seconds
            row = {
                "task": task, "preset": preset, "steps": n,
                "first_edit_s": round(first_s, 3), "later_edit_s": round(later.seconds, 3),
                "first_edit_fe": round(first_s / fe, 1), "later_edit_fe": round(later.seconds / fe, 1),
                "official_code_fe_estimate": round(official_s / fe, 1),
                "first_vs_official": round(first_s / official_s, 3),
                "later_vs_first": round(later.seconds / first_s, 3),
                "phases_first_s": {k: round(v, 3) for k, v in
                                   {"invert_call": invert_s, **first.phases}.items()},
                "phases_later_s": {k: round(v, 3) for k, v in later.phases.items()},
                "passes_first": first_counts, "passes_later": later.pass_counts, "passes_official": official,
                "peak_memory_first_bytes": first_peak, "peak_memory_later_bytes": later_peak,
                "inversion_bytes": inv.nbytes,
            }
            rows.append(row)
            print(f"{task:10s} {preset:8s} first {first_s:7.2f} s ({row['first_edit_fe']:6.1f} FE)  later "
                  f"{later.seconds:7.2f} s ({row['later_edit_fe']:6.1f} FE)  official code ~"
                  f"{row['official_code_fe_estimate']:6.1f} FE  peak {first_peak / 2**20:7.0f} MiB", flush=True)
    return {"pass_seconds": {k: round(v, 5) for k, v in costs.items()}, "latent_hw": list(latent_hw),
            "warmup_s": round(warmup_s, 1), "rows": rows}


def grey_difference_vs_eager(pipe, size: int, task: str, preset: str, steps: int | None) -> int:
    """Largest difference (grey levels) between this compiled pipeline's edit and the same edit run eager."""
    example = scene(size)
    settings = pipe.compiled
    compiled = np.asarray(_edit(pipe, task, example.image, preset, size, steps, example).image).astype(int)
    pipe.disable_compile()
    try:
        eager = np.asarray(_edit(pipe, task, example.image, preset, size, steps, example).image).astype(int)
    finally:
        pipe.enable_compile(settings.backend, settings.mode)
    return int(np.abs(compiled - eager).max())


def table(result: dict) -> str:
    lines = ["| task | preset | steps | first edit s (FE) | later edit s (FE) | official code FE (est.) | "
             "first / official | later / first | passes first: inv, CFG, TT, feat, feat-grad, bwd | peak MiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        p = r["passes_first"]
        lines.append(
            f"| {r['task']} | {r['preset']} | {r['steps']} | {r['first_edit_s']} ({r['first_edit_fe']}) | "
            f"{r['later_edit_s']} ({r['later_edit_fe']}) | {r['official_code_fe_estimate']} | "
            f"{r['first_vs_official']} | {r['later_vs_first']} | {p['inversion_unet']}, {p['cfg_unet']}, "
            f"{p['time_travel_unet']}, {p['feature_nograd']}, {p['feature_grad']}, {p['backward']} | "
            f"{r['peak_memory_first_bytes'] / 2**20:.0f} |")
    return "\n".join(lines)


def _estimate_main(args) -> int:
    """`bench speed --estimate`: FLOPs per edit (estimate_work), printed and saved."""
    from ..tiny import SHAPED

    from ..tiny import LAYOUTS

    model = "tiny-sd1" if args.model == "tiny" else args.model
    allowed = sorted(SHAPED) + [f"tiny-{x}" for x in LAYOUTS]
    if model not in allowed:
        raise SystemExit(f"--model: --estimate takes one of {', '.join(allowed)}, got {args.model!r}")
    torch.set_num_threads(args.threads)
    size = args.size or SHAPED.get(model, 128)
    result = estimate_work(model, size, getattr(torch, args.dtype or "bfloat16"), args.presets,
                           args.gradient_checkpointing)
    per_pass = result["pass_flops"]
    print(f"{model} at {size} px ({result['pass_flops']['backbone']}), FLOPs counted on fake tensors "
          f"(an estimate, nothing timed):")
    for key in ("denoiser_forward", "feature_forward", "feature_backward", "text", "encode", "decode"):
        print(f"  {key:18s} {per_pass[key] / 1e12:9.2f} TFLOP")
    for preset, row in result["presets"].items():
        print(f"  {preset:8s} {row['steps']:3d} steps: {row['flops'] / 1e15:8.2f} PFLOP per edit "
              f"({row['forward_equivalents']} denoiser forwards)")
    out = args.out or Path(f"out/bench/work-{model}-{size}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="dragondiff bench speed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny",
                        help="tiny | bundled | sd15-shaped | sd21-shaped | sdxl-shaped | sd35m-shaped | flux-shaped "
                             "(full sizes, random weights) | a diffusers folder")
    parser.add_argument("--size", type=int, default=None, help="working resolution (128 tiny/bundled, else 512)")
    parser.add_argument("--tasks", nargs="+", choices=list(BENCH_CASES), default=list(BENCH_CASES),
                        help="benchmark cases (each task's declared cases)")
    parser.add_argument("--presets", nargs="+", choices=sorted(PRESETS), default=["official", "paper", "fast"])
    parser.add_argument("--steps", type=int, default=None,
                        help="sampling steps (default: each preset's); fewer make a big model affordable on a CPU")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: the best available)")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="model dtype (default float16 on CUDA, float32 elsewhere)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (2)")
    parser.add_argument("--backward", choices=["auto", "one", "two"], default="auto",
                        help="energy gradients: one batched backward, the official code's two, or auto (one on CUDA)")
    parser.add_argument("--bank-device", default=None,
                        help="where banks live (default: the compute device; cpu = offloaded, for small GPUs)")
    parser.add_argument("--image-prompt", choices=["off", "random"], default="off",
                        help="random: a random IP-Adapter of the official shapes (64 tokens; used by the official "
                             "and fast presets), to measure what the image prompt costs")
    parser.add_argument("--compile", choices=["off", "inductor", "aot_eager"], default="off",
                        help="run the UNet's blocks compiled (pipe.enable_compile); the warm-up then measures the "
                             "cold start, and the output is compared with an eager run of the same edit")
    parser.add_argument("--channels-last", action="store_true",
                        help="channels-last convolutions (pipe.enable_channels_last): faster on a CPU")
    parser.add_argument("--estimate", action="store_true",
                        help="no run: FLOPs per edit of each preset on fake tensors (a tiny-<layout> or full-size "
                             "*-shaped model, e.g. flux-shaped, sd35m-shaped; default dtype bfloat16), nothing timed")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="with --estimate: count the guidance pass's recomputation")
    parser.add_argument("--out", type=Path, default=None, help="JSON file (out/bench/speed-<model>-<size>.json)")
    args = parser.parse_args(argv)
    if args.estimate:
        return _estimate_main(args)
    from ..compile import cache_hits, compile_cache_dir
    from ..loading import cpu_description

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    t = time.perf_counter()
    pipe, default_size = load_model(args.model, args.device, dtype)
    pipe.one_backward = {"auto": None, "one": True, "two": False}[args.backward]
    image_prompt = attach_random_image_prompt(pipe) if args.image_prompt == "random" else None
    if args.channels_last:
        pipe.enable_channels_last()
    if args.compile != "off":
        pipe.enable_compile(backend=args.compile)
    load_s = time.perf_counter() - t
    size = args.size or default_size
    result = run(pipe, size, args.tasks, args.presets, args.steps, bank_device=args.bank_device)
    grey = None if args.compile == "off" else grey_difference_vs_eager(pipe, size, args.tasks[0], args.presets[0],
                                                                        args.steps)
    meta = {"model": args.model, "size": size, "device": str(pipe.device),
            "dtype": str(pipe.dtype).replace("torch.", ""),
            "gpu": torch.cuda.get_device_name(pipe.device) if pipe.device.type == "cuda" else None,
            "threads": args.threads,
            "one_backward": pipe.uses_one_backward,
            "bank_device": args.bank_device or str(pipe.device), "load_s": round(load_s, 1),
            "image_prompt": image_prompt, "channels_last": args.channels_last, "compile": args.compile,
            "max_grey_difference_vs_eager": grey,
            # graphs loaded from torch's on-disk caches instead of generated: > 0 when an earlier process compiled
            "compile_cache_hits": None if args.compile == "off" else cache_hits(),
            "compile_cache_dir": None if args.compile == "off" else str(compile_cache_dir()),
            "torch": torch.__version__, "machine": platform.machine(), **cpu_description()}
    suffix = ("-ip" if image_prompt else "") + ("-cl" if args.channels_last else "") + (
        "" if args.compile == "off" else f"-{args.compile}")
    out = args.out or Path(f"out/bench/speed-{Path(args.model).name}-{size}{suffix}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, **result}, indent=1))
    print()
    print(table(result))
    print(f"\nwarm-up (with --compile: the cold start) {result['warmup_s']} s; "
          f"FE = one batch-1 UNet forward = {result['pass_seconds']['unet_forward_b1'] * 1e3:.1f} ms; "
          f"{json.dumps(meta)}  -> {out}")
    return 0
