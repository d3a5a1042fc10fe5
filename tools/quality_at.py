"""The model-quality gates of `dragondiff bench shapes --quality` at a chosen working size and sample counts, on one
torch thread (the CLI uses two and the full counts):

    python tools/quality_at.py --model out/v3/model-A --size 256 --n 64 8 32 --out docs/results/quality-v3.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--n", type=int, nargs=3, default=[256, 32, 64], metavar=("VAE", "INVERSION", "SAMPLES"))
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from PIL import Image
    import numpy as np

    from dragondiff.bench.shapes import _pipe, quality

    q = quality(_pipe(args.model), *args.n, size=args.size)
    samples = q.pop("_samples")
    Image.fromarray(np.concatenate([np.concatenate(list(samples[r * 8 : r * 8 + 8]), 1) for r in range(2)], 0)
                    ).save(args.out.with_suffix(".png"))
    q["model"] = args.model or "bundled"
    args.out.write_text(json.dumps(q, indent=1))
    print(json.dumps(q, indent=1))


if __name__ == "__main__":
    main()
