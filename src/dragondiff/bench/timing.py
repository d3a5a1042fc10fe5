"""`dragondiff bench timing`: one timed edit per task and preset on the tiny random model (128 px).

Numbers measure the engine's overhead and pass structure, not a real model's cost. Run on an otherwise idle
machine; results go to out/bench/timing.json and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from ..presets import PRESETS


def scene():
    yy, xx = np.mgrid[0:128, 0:128]
    img = np.zeros((128, 128, 3), np.uint8)
    img[...] = (40, 160, 70)
    disc = (xx - 40) ** 2 + (yy - 64) ** 2 <= 18**2
    square = (abs(xx - 96) <= 14) & (abs(yy - 30) <= 14)
    img[disc], img[square] = (220, 40, 40), (40, 70, 220)
    drag = np.zeros_like(disc)
    drag[40:100, 20:80] = True
    return img, disc, square, drag


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="dragondiff bench timing")
    parser.add_argument("--out", type=Path, default=Path("out/bench/timing.json"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from ..tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(device="cpu")
    img, disc, square, drag = scene()
    tasks = {
        "move": lambda **k: pipe.move(img, disc, offset=(32, 0), **k),
        "resize": lambda **k: pipe.move(img, disc, offset=(8, 0), scale=1.3, **k),
        "drag": lambda **k: pipe.drag(img, [((40, 64), (56, 64))], drag, **k),
        "appearance": lambda **k: pipe.replace_appearance(img, disc, img, square, **k),
        "paste": lambda **k: pipe.paste(img, img, square, offset=(-50, 50), **k),
    }
    tasks["move"](max_resolution=128, num_inference_steps=2, progress=False)  # warm-up
    rows = []
    for preset in PRESETS:
        for name, fn in tasks.items():
            t = time.perf_counter()
            out = fn(max_resolution=128, preset=preset, progress=False)
            rows.append({"task": name, "preset": preset, "seconds": round(time.perf_counter() - t, 2),
                         **out.pass_counts})
    meta = {"model": "tiny random SD1.5-layout (dragondiff.tiny)", "size": "128x128", "steps": 50,
            "threads": args.threads, "torch": torch.__version__, "machine": platform.machine()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print("| task | preset | seconds | inversion | CFG | time travel | feat. no-grad | feat. grad | backward |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['task']} | {r['preset']} | {r['seconds']} | {r['inversion_unet']} | {r['cfg_unet']} | "
              f"{r['time_travel_unet']} | {r['feature_nograd']} | {r['feature_grad']} | {r['backward']} |")
    print(f"\n{json.dumps(meta)}  -> {args.out}")
    return 0
