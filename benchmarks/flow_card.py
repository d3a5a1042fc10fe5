"""What a user needs to choose a card for SD3.5-Medium and FLUX.1-dev (issue 29, item 6): the memory and the work of
one edit at 1024 px, estimated on full-size random models built on fake tensors (no GPU, no weights, nothing
timed). Writes docs/results/memory-flow-1024.json and docs/results/work-flow-1024.json and prints the tables of
docs/backbones.md and docs/speed.md.

    python benchmarks/flow_card.py                     # about 10 minutes of one CPU core
    python benchmarks/flow_card.py --models flux-shaped --dtypes bfloat16

Each memory row is `dragondiff bench memory --model M --dtype D [--gradient-checkpointing]` (bank on the GPU); the
bank-on-CPU peak of the same row is `--bank-device cpu`'s: the same passes, without the bank and the cached
features resident (peak − bank − cached features). The work rows are `dragondiff bench speed --model M --estimate
[--gradient-checkpointing]`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from dragondiff.bench.memory import estimate
from dragondiff.bench.speed import estimate_work

GIB = 2**30
MODELS = ("sd35m-shaped", "flux-shaped")


def memory_rows(models, dtypes, size: int) -> list[dict]:
    rows = []
    for model in models:
        for dtype in dtypes:
            for checkpointing in (False, True):
                start = time.perf_counter()
                r = estimate(model, size, getattr(torch, dtype), gradient_checkpointing=checkpointing)
                r["peak_bank_on_cpu_bytes"] = r["peak_estimate_bytes"] - r["bank_bytes"] - r["feature_cache_bytes"]
                r["cpu_seconds"] = round(time.perf_counter() - start, 1)
                rows.append(r)
                print(f"{model} {dtype} checkpointing={checkpointing}: peak {r['peak_estimate_bytes'] / GIB:.2f} GiB "
                      f"(bank on CPU {r['peak_bank_on_cpu_bytes'] / GIB:.2f}), largest pass {r['largest_pass']} "
                      f"{r['pass_peak_bytes'][r['largest_pass']] / GIB:.2f} GiB, {r['cpu_seconds']} s", flush=True)
    return rows


def memory_table(rows: list[dict]) -> str:
    lines = ["| model, dtype | checkpointing | weights: denoiser + text encoders + VAE | bank (50 steps) | cached "
             "features | guidance pass | largest other pass | peak, bank on GPU | peak, bank on CPU |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        w = r["weights_by_part_bytes"]
        text = sum(v for k, v in w.items() if k.startswith("text_encoder"))
        passes = r["pass_peak_bytes"]
        other = max((v, k) for k, v in passes.items() if k != "guidance")
        name = {"sd35m-shaped": "SD3.5-Medium", "flux-shaped": "FLUX.1-dev"}.get(r["model"], r["model"])
        lines.append(
            f"| {name}, {r['dtype']} | {'on' if r['gradient_checkpointing'] else 'off'} | "
            f"{r['weights_bytes'] / GIB:.2f} = {w['denoiser'] / GIB:.2f} + {text / GIB:.2f} + {w['vae'] / GIB:.2f} | "
            f"{r['bank_bytes'] / GIB:.2f} | {r['feature_cache_bytes'] / GIB:.2f} | {passes['guidance'] / GIB:.2f} | "
            f"{other[0] / GIB:.2f} ({other[1]}) | {r['peak_estimate_bytes'] / GIB:.2f} | "
            f"{r['peak_bank_on_cpu_bytes'] / GIB:.2f} |")
    return "\n".join(lines)


def work_rows(models, size: int) -> list[dict]:
    rows = []
    for model in models:
        for checkpointing in (False, True):
            start = time.perf_counter()
            r = estimate_work(model, size, torch.bfloat16, gradient_checkpointing=checkpointing)
            r["cpu_seconds"] = round(time.perf_counter() - start, 1)
            rows.append(r)
            print(f"{model} checkpointing={checkpointing}: " + ", ".join(
                f"{p} {v['flops'] / 1e15:.1f} PFLOP" for p, v in r["presets"].items()) + f", {r['cpu_seconds']} s",
                flush=True)
    return rows


def work_table(rows: list[dict]) -> str:
    lines = ["| model | checkpointing | one denoiser forward | feature pass: forward, backward (one energy term) | "
             "official: passes (inv, CFG, TT, ref, grad) | official PFLOP (forwards) | fast: passes | "
             "fast PFLOP (forwards) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p = r["pass_flops"]
        name = {"sd35m-shaped": "SD3.5-Medium", "flux-shaped": "FLUX.1-dev"}.get(r["model"], r["model"])

        def passes(c):
            return (f"{c['inversion_unet']}, {c['cfg_unet']}×{p['cfg_batch']}, {c['time_travel_unet']}, "
                    f"{c['feature_nograd']}, {c['feature_grad']}")

        o, f = r["presets"]["official"], r["presets"]["fast"]
        lines.append(
            f"| {name} | {'on' if r['gradient_checkpointing'] else 'off'} | {p['denoiser_forward'] / 1e12:.1f} "
            f"TFLOP | {p['feature_forward'] / 1e12:.1f}, {p['feature_backward'] / 1e12:.1f} TFLOP | "
            f"{passes(o['passes'])} | {o['flops'] / 1e15:.2f} ({o['forward_equivalents']}) | {passes(f['passes'])} | "
            f"{f['flops'] / 1e15:.2f} ({f['forward_equivalents']}) |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"], choices=["float16", "bfloat16"])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--skip", choices=["memory", "work"], default=None)
    parser.add_argument("--out", type=Path, default=Path("docs/results"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    meta = {"size": args.size, "torch": torch.__version__, "method": "fake tensors (FakeTensorMode), no GPU, "
            "no weights, nothing timed; `official` preset, move (one image), 50 steps"}
    if args.skip != "memory":
        rows = memory_rows(args.models, args.dtypes, args.size)
        (args.out / f"memory-flow-{args.size}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        print(memory_table(rows))
    if args.skip != "work":
        rows = work_rows(args.models, args.size)
        (args.out / f"work-flow-{args.size}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        print(work_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
