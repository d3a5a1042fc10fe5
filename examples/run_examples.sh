#!/usr/bin/env bash
# Runs the README's command-line examples with the bundled model into OUT (default: examples-out/), with previews.
# The README's pictures (docs/img/cli/) are these previews.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-examples-out}
mkdir -p "$OUT"
P="a red circle and a blue square on a green background"
dragondiff move examples/scene.png --mask examples/circle_mask.png --offset 44,24 --prompt "$P" --preview \
    -o "$OUT/move.png" --overwrite
dragondiff move examples/scene.png --mask examples/circle_mask.png --offset 30,10 --scale 1.3 --prompt "$P" \
    --preview -o "$OUT/resize.png" --overwrite
dragondiff drag examples/scene.png --mask examples/editable_mask.png --prompt "$P" \
    --points "40,64:70,80 28,52:58,68 52,76:82,92" --preview -o "$OUT/drag.png" --overwrite
dragondiff appearance examples/scene.png --mask examples/circle_mask.png --reference examples/reference.png \
    --reference-mask examples/reference_circle_mask.png --prompt "a circle and a blue square on a green background" \
    --preview -o "$OUT/appearance.png" --overwrite
dragondiff paste examples/scene.png --reference examples/reference.png \
    --reference-mask examples/reference_triangle_mask.png --offset 4,10 \
    --prompt "a red circle, a blue square and a white triangle on a green background" --preview \
    -o "$OUT/paste.png" --overwrite
dragondiff run examples/edits.json -o "$OUT/spec" --overwrite
dragondiff batch examples/dragbench -o "$OUT/dragbench" --overwrite
