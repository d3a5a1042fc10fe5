"""Command line: `dragondiff demo` (the README's main job) and `dragondiff bench ...`."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .presets import PRESETS


def draw_arrow(image: Image.Image, start, end, colour=(255, 255, 255)) -> Image.Image:
    out = image.copy()
    d = ImageDraw.Draw(out)
    d.line([tuple(start), tuple(end)], fill=colour, width=2)
    v = np.subtract(end, start).astype(float)
    n = np.linalg.norm(v)
    if n > 0:
        v /= n
        left = np.array(end) - 6 * v + 4 * np.array([-v[1], v[0]])
        right = np.array(end) - 6 * v - 4 * np.array([-v[1], v[0]])
        d.polygon([tuple(end), tuple(left), tuple(right)], fill=colour)
    d.ellipse([start[0] - 2, start[1] - 2, start[0] + 2, start[1] + 2], fill=(60, 120, 255))
    return out


def side_by_side(*images: Image.Image, gap: int = 4) -> Image.Image:
    w = sum(im.width for im in images) + gap * (len(images) - 1)
    h = max(im.height for im in images)
    sheet = Image.new("RGB", (w, h), (255, 255, 255))
    x = 0
    for im in images:
        sheet.paste(im, (x, 0))
        x += im.width + gap
    return sheet


def demo_case():
    """The demo's example: a bundled-style scene with one object and room to move it."""
    from .shapes.scenes import Shape, make_scene

    scene = make_scene([Shape("circle", "red", 40.0, 64.0, 20.0), Shape("square", "blue", 100.0, 28.0, 16.0)],
                       ("green", None, 0.0))
    return scene, scene.masks[0], (44, 24)


def cmd_demo(args) -> int:
    from .pipeline import DragonPipeline
    from .shapes import model as shapes_model

    t0 = time.perf_counter()
    if args.tiny or not shapes_model.is_available():
        from .tiny import build_tiny_pipeline

        print("smoke demo: tiny random-weight model (the output is noise, the pipeline is real)", file=sys.stderr)
        pipe = build_tiny_pipeline()
    else:
        pipe = DragonPipeline.bundled()
    scene, mask, offset = demo_case()
    out = pipe.move(scene.image, mask, offset=offset, prompt=scene.caption, preset=args.preset,
                    max_resolution=128, seed=args.seed)
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    ys, xs = np.nonzero(mask)
    start = (float(xs.mean()), float(ys.mean()))
    end = (start[0] + offset[0], start[1] + offset[1])
    out.input_image.save(folder / "input.png")
    out.image.save(folder / "result.png")
    side_by_side(draw_arrow(out.input_image, start, end), out.image).save(folder / "side_by_side.png")
    summary = {"task": "move", "preset": args.preset, "offset": offset, "caption": scene.caption,
               "edit_seconds": round(out.seconds, 1), "total_seconds": round(time.perf_counter() - t0, 1),
               "files": [str(folder / n) for n in ("input.png", "result.png", "side_by_side.png")]}
    print(json.dumps(summary, indent=1))
    return 0


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(prog="dragondiff", description="DragonDiffusion drag-style image editing")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="move an object in a bundled example scene; writes input/result/side-by-side")
    demo.add_argument("--out", default="dragondiff-demo", help="output folder (default: ./dragondiff-demo)")
    demo.add_argument("--preset", default="official", choices=sorted(PRESETS))
    demo.add_argument("--seed", type=int, default=42)
    demo.add_argument("--tiny", action="store_true", help="use a tiny random model (smoke test of the pipeline)")
    demo.set_defaults(func=cmd_demo)
    bench = sub.add_parser("bench", help="benchmarks: `bench timing` (tiny model), `bench shapes` (bundled model)")
    bench.add_argument("which", choices=["timing", "shapes"])
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    bench.set_defaults(func=lambda a: _bench(a.which, a.rest))
    args = parser.parse_args(argv)
    return args.func(args)


def _bench(which: str, rest: list[str]) -> int:
    if which == "timing":
        from .bench.timing import main as run
    else:
        from .bench.shapes import main as run
    return run(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
