#!/usr/bin/env bash
# Ray's overhead on one machine: the same tiny-model batch (N DragBench-layout samples, 64 px, 2 steps) through the
# local batch and through `--ray` with 1 and 2 workers; wall seconds of each whole command (start-up, model loads and
# edits included), and a check that every image is the same. Run on an otherwise idle machine:
#   bash benchmarks/ray_overhead.sh [N=8]        -> out/bench/ray_overhead.json
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-8}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export HF_HUB_OFFLINE=1
python - "$WORK/in" "$N" <<'PY'
import pickle, sys
from pathlib import Path
import numpy as np
from PIL import Image
root, n = Path(sys.argv[1]), int(sys.argv[2])
rng = np.random.default_rng(0)
for k in range(n):
    folder = root / f"cat{k % 3}" / f"s{k}"
    folder.mkdir(parents=True)
    img = np.full((64, 64, 3), (60, 140, 90), np.uint8)
    y, x = rng.integers(16, 48, 2)
    img[y - 8:y + 8, x - 8:x + 8] = (220, 40, 40)
    Image.fromarray(img).save(folder / "original_image.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[8:56, 8:56] = 1
    pickle.dump({"prompt": "a red square", "points": [(int(x), int(y)), (int(x) + 6, int(y))], "mask": mask},
                open(folder / "meta_data.pkl", "wb"))
PY
FAST=(--model tests/data/tiny-model --steps 2 --max-resolution 64 --threads 1 -q)
run() {  # name, args...: wall seconds of one batch into $WORK/<name>
    local name=$1; shift
    local t0; t0=$(date +%s.%N)
    dragondiff batch "$WORK/in" -o "$WORK/$name" "${FAST[@]}" "$@" >/dev/null 2>"$WORK/$name.log" || { cat "$WORK/$name.log"; exit 1; }
    python -c "import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 2))" "$t0" "$(date +%s.%N)"
}
LOCAL=$(run local)
RAY1=$(run ray1 --ray --ray-workers 1)
RAY2=$(run ray2 --ray --ray-workers 2)
for d in ray1 ray2; do
    (cd "$WORK/local" && find . -name '*.png' | sort | while read -r f; do cmp -s "$f" "$WORK/$d/$f" || echo "DIFFERS: $d/$f"; done)
done
mkdir -p out/bench
python - "$N" "$LOCAL" "$RAY1" "$RAY2" <<'PY' | tee out/bench/ray_overhead.json
import json, os, sys, ray
n, local, r1, r2 = int(sys.argv[1]), *map(float, sys.argv[2:])
print(json.dumps({"samples": n, "cores": os.cpu_count(), "ray": ray.__version__, "seconds": {
    "local": local, "ray_1_worker": r1, "ray_2_workers": r2}, "ray_overhead_seconds_1_worker": round(r1 - local, 2)},
    indent=1))
PY
