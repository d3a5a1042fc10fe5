"""Writes the example inputs the README's command-line examples use (run from the repository root):

    python examples/make_examples.py

scene.png (a red circle and a blue square on green, the demo's scene), its object masks, an editable area for
drag, a reference image (a yellow circle and a white triangle on black) with its masks, a spec file, and a
one-sample DragBench-layout folder. All drawn by the bundled model's scene generator, so the model knows them.
"""

import json
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

from dragondiff.shapes.scenes import Shape, make_scene

HERE = Path(__file__).parent


def save_mask(mask: np.ndarray, path: Path) -> None:
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)


def main() -> None:
    scene = make_scene([Shape("circle", "red", 40.0, 64.0, 20.0), Shape("square", "blue", 100.0, 28.0, 16.0)],
                       ("green", None, 0.0))
    Image.fromarray(scene.image).save(HERE / "scene.png")
    save_mask(scene.masks[0], HERE / "circle_mask.png")
    save_mask(scene.masks[1], HERE / "square_mask.png")
    editable = np.zeros(scene.masks[0].shape, bool)
    editable[36:116, 14:100] = True  # the circle and room to its right and below
    save_mask(editable, HERE / "editable_mask.png")

    ref = make_scene([Shape("circle", "yellow", 40.0, 40.0, 20.0), Shape("triangle", "white", 92.0, 88.0, 22.0)],
                     ("black", None, 0.0))
    Image.fromarray(ref.image).save(HERE / "reference.png")
    save_mask(ref.masks[0], HERE / "reference_circle_mask.png")
    save_mask(ref.masks[1], HERE / "reference_triangle_mask.png")

    prompt = scene.caption
    edits = {"edits": [
        {"task": "move", "image": "scene.png", "mask": "circle_mask.png", "offset": [44, 24], "prompt": prompt},
        {"task": "move", "image": "scene.png", "mask": "circle_mask.png", "offset": [30, 10], "scale": 1.3,
         "prompt": prompt},
    ]}
    (HERE / "edits.json").write_text(json.dumps(edits, indent=1) + "\n")

    sample = HERE / "dragbench" / "shapes" / "circle_right"
    sample.mkdir(parents=True, exist_ok=True)
    Image.fromarray(scene.image).save(sample / "original_image.png")
    # DragBench's meta_data.pkl: prompt, points alternating handle/target (x, y), mask uint8 with 1 = editable.
    points = [(40, 64), (70, 80), (28, 52), (58, 68), (52, 76), (82, 92)]
    with open(sample / "meta_data.pkl", "wb") as f:
        pickle.dump({"prompt": prompt, "points": points, "mask": editable.astype(np.uint8)}, f)


if __name__ == "__main__":
    main()
