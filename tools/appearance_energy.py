"""Is appearance limited by the model or by the task's energy? Edit success, colour (ΔE), shape IoU and background
PSNR of the benchmark's appearance cases against the energy scale, at 128 px and with the scenes redrawn at 256 px.
Colours and background are measured against the model's own VAE round trip at the working size.

    python tools/appearance_energy.py --model <folder or omit> --cases 2000 10 --cfg 2 \
        --grid 128:0,5,10,20 256:5,10,20 --out docs/results/appearance-energy.json

One torch thread; every edit is appended to the JSON as it finishes (a killed run keeps what it measured).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--cases", type=int, nargs=2, default=[2000, 10], metavar=("FIRST", "N"))
    ap.add_argument("--cfg", type=float, default=2.0)
    ap.add_argument("--grid", nargs="+", default=["128:0,5,10,20", "256:5,10,20"])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from dragondiff.bench.cases import make_case
    from dragondiff.bench.shapes import _pipe, at_bench_size, evaluate, run_edit

    pipe = _pipe(args.model)
    rows = []
    for item in args.grid:
        res, energies = item.split(":")
        for energy in [float(e) for e in energies.split(",")]:
            for k in range(args.cases[0], args.cases[0] + args.cases[1]):
                case = make_case("appearance", k)
                t0 = time.perf_counter()
                out = run_edit(pipe, case, "official", resolution=int(res), guidance_scale=args.cfg,
                               energy_scale=energy)
                m = evaluate(pipe, case, at_bench_size(out.image), int(res))
                rows.append({"resolution": int(res), "energy": energy, "cfg": args.cfg, "k": k,
                             "seconds": round(time.perf_counter() - t0, 1), **m})
                print(json.dumps(rows[-1]), flush=True)
                args.out.write_text(json.dumps({"model": args.model or "bundled", "rows": rows}, indent=1,
                                               default=float))
    summary = []
    for res, energy in dict.fromkeys((r["resolution"], r["energy"]) for r in rows):
        rs = [r for r in rows if (r["resolution"], r["energy"]) == (res, energy)]
        summary.append({"resolution": res, "energy": energy, "n": len(rs),
                        "success": float(np.mean([r["success"] for r in rs])),
                        **{f"median_{k}": float(np.median([r[k] for r in rs]))
                           for k in ("delta_e", "shape_iou", "bg_psnr_recon_db")}})
        print(json.dumps(summary[-1]))
    args.out.write_text(json.dumps({"model": args.model or "bundled", "summary": summary, "rows": rows}, indent=1,
                                   default=float))


if __name__ == "__main__":
    main()
