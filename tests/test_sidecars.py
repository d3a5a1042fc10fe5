"""Sidecars and a flat spec file written by the release before the typed task parameters (v0.1.0, db81b78) re-run
to the same image, bit for bit, on the bundled model (tests/data/sidecars: 128 px scenes, 4 steps)."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_cli import cli

SIDECARS = Path(__file__).parent / "data" / "sidecars"
NAMES = ("move", "drag", "appearance", "paste", "move-region")
ADDED_FIELDS = {"image_prompt": False, "ip_scale": 0.1, "ip_routing": "official"}


def read(path):
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def bundled():
    from dragondiff import DragonPipeline
    from dragondiff.shapes import model

    if not model.is_available():
        pytest.skip("the bundled model's weights are not installed")
    return DragonPipeline.bundled(device="cpu")


def _rerun(pipe, data: dict, base_dir: Path):
    from dragondiff import EditSpec
    from dragondiff.output import full_resolution

    spec = EditSpec.from_dict(data, base_dir=base_dir)
    result = pipe.edit(spec, progress=False)
    return spec, result, np.asarray(full_resolution(result, spec.image))


@pytest.mark.parametrize("name", NAMES)
def test_release_sidecar_reruns_bit_for_bit(bundled, name):
    sidecar = json.loads((SIDECARS / f"{name}.json").read_text())
    spec, result, image = _rerun(bundled, sidecar["spec"], SIDECARS)
    assert np.array_equal(image, read(SIDECARS / sidecar["output"]["file"])), name
    # The resolved spec still serialises to what the release wrote (flat JSON, every default filled), minus the
    # other tasks' fields, which the release wrote as null.
    again = json.loads(result.spec.to_json())
    again["image"], sidecar["spec"]["image"] = Path(again["image"]).name, Path(sidecar["spec"]["image"]).name
    for key in ("mask", "reference", "reference_mask", "reference_region"):
        if isinstance(again.get(key), str):
            again[key] = Path(again[key]).name
    # Fields added after the release (the image prompt) resolve to values that change nothing without an adapter.
    assert {k: again.pop(k) for k in ADDED_FIELDS} == ADDED_FIELDS
    assert again == {k: v for k, v in sidecar["spec"].items() if k in again}
    assert all(sidecar["spec"][k] is None for k in set(sidecar["spec"]) - set(again))


def test_release_flat_spec_file_reruns_bit_for_bit(bundled):
    path = SIDECARS / "specs" / "move-region.json"
    _, _, image = _rerun(bundled, json.loads(path.read_text()), path.parent)
    assert np.array_equal(image, read(SIDECARS / "move-region.png"))


def test_release_sidecars_through_the_cli(bundled, tmp_path):
    """`dragondiff run` on every sidecar at once (the sidecars name the bundled model)."""
    out = cli("run", *[SIDECARS / f"{n}.json" for n in NAMES], "-o", tmp_path, "--threads", "1", "-q")
    assert out.returncode == 0, out.stderr
    for name in NAMES:
        assert np.array_equal(read(tmp_path / f"{name}.png"), read(SIDECARS / f"{name}.png")), name
