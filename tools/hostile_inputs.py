"""Peak memory of the command line on the hostile inputs of the reliability probe (its items 3-5): a YAML alias
bomb under `offset:`, a 137-byte meta_data.pkl asking for a 40000x40000 array, and huge prompts. Each runs as its
own `dragondiff` process under /usr/bin/time; prints a table and writes the numbers as JSON.

    python tools/hostile_inputs.py --out benchmarks/hostile_inputs.json
"""

from __future__ import annotations

import argparse
import json
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

EXE = str(Path(sys.executable).parent / "dragondiff")


class _ArrayBomb:
    def __reduce__(self):
        return np.ndarray, ((40000, 40000), "f2")


def alias_bomb(levels: int = 9) -> str:
    lines = ["l0: &l0 [x, x, x, x, x, x, x, x, x]"]
    for k in range(1, levels):
        lines.append(f"l{k}: &l{k} [" + ", ".join([f"*l{k - 1}"] * 9) + "]")
    return "\n".join(lines) + f"\noffset: *l{levels - 1}\n"


def cases(folder: Path) -> dict[str, list[str]]:
    img = np.zeros((64, 64, 3), np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[20:40, 20:40] = 255
    Image.fromarray(img).save(folder / "scene.png")
    Image.fromarray(mask).save(folder / "mask.png")
    (folder / "bomb.yaml").write_text("task: move\nimage: scene.png\nmask: mask.png\n" + alias_bomb())
    sample = folder / "bench" / "cat" / "s1"
    sample.mkdir(parents=True)
    Image.fromarray(img).save(sample / "original_image.png")
    (sample / "meta_data.pkl").write_bytes(pickle.dumps({"prompt": "x", "points": [(1, 1), (2, 2)],
                                                         "mask": _ArrayBomb()}))
    prompt = "a red disc " * 350_000  # 3.85 MB: the largest prompt a spec file (4 MiB at most) can carry
    (folder / "prompt.json").write_text(json.dumps({"task": "move", "image": "scene.png", "mask": "mask.png",
                                                    "offset": [8, 0], "prompt": prompt}))
    move = ["move", str(folder / "scene.png"), "--mask", str(folder / "mask.png"), "--offset", "8,0", "--dry-run"]
    return {
        "3 alias bomb spec (run --dry-run)": ["run", str(folder / "bomb.yaml"), "--dry-run"],
        "4 pickle array bomb (batch --dry-run)": ["batch", str(folder / "bench"), "-o", str(folder / "out"),
                                                  "--dry-run"],
        "5 3.85 MB prompt in a spec (run --dry-run)": ["run", str(folder / "prompt.json"), "--dry-run"],
        "5 100 kB --prompt (move --dry-run)": move + ["--prompt", "a red disc " * 9_000],
        "baseline: a valid move --dry-run": move,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write the numbers here as JSON")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, cli_args in cases(Path(tmp)).items():
            start = time.perf_counter()
            proc = subprocess.run(["/usr/bin/time", "-f", "MAXRSS_KB %M", EXE, *cli_args], capture_output=True,
                                  text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}, cwd=tmp)
            seconds = time.perf_counter() - start
            rss = int(next(line for line in proc.stderr.splitlines() if line.startswith("MAXRSS_KB")).split()[1])
            lines = [line.strip() for line in proc.stderr.splitlines()]
            message = next((line for line in lines if "rror" in line or "failed " in line), "")[:160]
            rows.append({"case": name, "exit": proc.returncode, "peak_rss_mib": round(rss / 1024, 1),
                         "seconds": round(seconds, 2), "message": message})
            print(f"{name:45s} exit {proc.returncode}  peak {rss / 1024:7.1f} MiB  {seconds:5.2f} s  {message}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
