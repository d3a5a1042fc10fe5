"""Inputs that used to exhaust memory or fail late (issue: reliability), each refused early and by name."""

import pickle
import tracemalloc

import numpy as np
import pytest

from dragondiff import dragbench


class _ArrayBomb:
    """Pickles as a call of the allowed numpy.ndarray constructor with a huge shape (a 40000x40000 array)."""

    def __reduce__(self):
        return np.ndarray, ((40000, 40000), "f2")


@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_tiny_pickle_cannot_allocate_a_huge_array(tmp_path, protocol):
    data = pickle.dumps({"prompt": "x", "points": [(1, 1), (2, 2)], "mask": _ArrayBomb()}, protocol=protocol)
    assert len(data) < 200
    path = tmp_path / "meta_data.pkl"
    path.write_bytes(data)
    tracemalloc.start()
    try:
        with pytest.raises(dragbench.UnsafePickleError, match=r"1,600,000,000 values.*nothing was allocated"):
            dragbench.read_meta(path, image_hw=(64, 64))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 10 * 2**20


def test_array_reconstruction_is_bounded_by_the_image(tmp_path):
    """The usual pickled mask (numpy's _reconstruct + setstate) loads; one larger than the image allows does not."""
    mask = np.zeros((64, 64), np.uint8)
    mask[10:20, 10:20] = 1
    path = tmp_path / "meta_data.pkl"
    path.write_bytes(pickle.dumps({"prompt": "p", "points": [(1, 1), (5, 5)], "mask": mask}))
    assert np.array_equal(dragbench.read_meta(path, image_hw=(64, 64))["mask"], mask)
    big = np.zeros((200, 200), np.uint8)
    path.write_bytes(pickle.dumps({"prompt": "p", "points": [(1, 1), (5, 5)], "mask": big}))
    # _reconstruct allocates an empty array; the data comes from the file, so only a shape past the bound fails
    out = dragbench.read_meta(path, image_hw=(400, 400))["mask"]
    assert out.shape == (200, 200)
    with pytest.raises(dragbench.UnsafePickleError, match="at most 16,384"):
        dragbench.load_restricted(pickle.dumps(_ArrayBomb()), "x", max_elements=16_384)


def _alias_bomb(levels: int = 9) -> str:
    """'Billion laughs': each anchor a list of nine aliases of the one before (9**9 leaves when expanded)."""
    lines = ["l0: &l0 [x, x, x, x, x, x, x, x, x]"]
    for k in range(1, levels):
        lines.append(f"l{k}: &l{k} [" + ", ".join([f"*l{k - 1}"] * 9) + "]")
    return "\n".join(lines) + f"\noffset: *l{levels - 1}\n"


def test_messages_print_a_short_sketch_of_a_huge_value():
    import yaml

    from dragondiff.validate import check_offset, check_point, shown

    data = yaml.safe_load(_alias_bomb())
    tracemalloc.start()
    try:
        with pytest.raises(TypeError, match=r"^offset must be a \(dx, dy\) pair") as err:
            check_offset(data["offset"])
        with pytest.raises(TypeError) as err2:
            check_point(data["offset"], "points[0] handle")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(str(err.value)) < 400 and len(str(err2.value)) < 400
    assert peak < 5 * 2**20
    assert shown(0.1) == "0.1" and len(shown("x" * 10_000)) < 80


def test_prompts_are_bounded_before_tokenising(tiny_pipe):
    from dragondiff.limits import LIMITS

    most = int(LIMITS["prompt_chars"].high)
    huge = "a red disc " * 1_000_000  # 11 MB
    with pytest.raises(ValueError, match=rf"prompt #0: 11,000,000 characters; at most {most:,}"):
        tiny_pipe.backbone.condition([huge])
    with pytest.raises(ValueError, match="characters; at most"):
        tiny_pipe.backbone.prompt_length(huge)
    assert tiny_pipe.backbone.prompt_length("a" * most) > 0


def test_every_geometry_check_runs_without_the_model(monkeypatch):
    """plan_edit (what a dry run calls) finds what the edit would refuse after loading the model: an offset of
    (0, 0), a handle equal to its target, an object moved off the image; and passes a valid edit."""
    from conftest import make_scene
    from dragondiff.backbone import SD1Backbone
    from dragondiff.loading import model_factors
    from dragondiff.pipeline import plan_edit
    from dragondiff.spec import EditSpec

    def boom(*args, **kwargs):
        raise AssertionError("the model ran")

    for name in ("forward", "condition", "encode_image", "decode"):
        monkeypatch.setattr(SD1Backbone, name, boom)
    img, disc, _ = make_scene()
    factors = model_factors("dragondiff:shapes")
    assert factors == (8, 2)
    cases = [
        (EditSpec(task="move", image=img, mask=disc, offset=(0, 0)), r"offset=\(0, 0\) with scale=1 is not an edit"),
        (EditSpec(task="move", image=img, mask=disc, offset=(400, 0)), "outside the image"),
        (EditSpec(task="drag", image=img, mask=disc, points=[((36, 44), (37, 44))]), "same 4-px feature cell"),
    ]
    for spec, message in cases:
        with pytest.raises(ValueError, match=message):
            plan_edit(spec, factors=factors, default_max_resolution=128)
    spec, prep, task = plan_edit(EditSpec(task="move", image=img, mask=disc, offset=(16, 0)), factors=factors,
                                 default_max_resolution=128)
    assert spec.w_edit == 4.0 and prep.size_hw == (128, 128) and task.name == "move"


def test_spec_bounds_prompts_and_prints_bounded_values():
    from dragondiff.limits import LIMITS
    from dragondiff.spec import EditSpec

    img = np.zeros((64, 64, 3), np.uint8)
    mask = np.zeros((64, 64), bool)
    mask[10:20, 10:20] = True
    most = int(LIMITS["prompt_chars"].high)
    with pytest.raises(ValueError, match=rf"^prompt: 50,000,000 characters; at most {most:,}"):
        EditSpec(task="move", image=img, mask=mask, offset=(8, 0), prompt="x" * 50_000_000)
    with pytest.raises(ValueError, match="^reference_prompt: .*characters; at most"):
        EditSpec(task="appearance", image=img, mask=mask, reference=img, reference_mask=mask,
                 reference_prompt="y" * (most + 1))
    with pytest.raises(ValueError) as err:
        EditSpec(task="move" * 10_000, image=img)
    assert len(str(err.value)) < 300


def test_cli_accepts_rgba_and_says_so_in_one_note(tmp_path):
    """An RGBA input (even fully opaque) is flattened as the web UI does; the CLI says so in a 'note:' line, with no
    Python file:line warning report."""
    from PIL import Image

    from conftest import make_scene
    from test_cli import FAST, cli

    img, disc, _ = make_scene()
    Image.fromarray(img).convert("RGBA").save(tmp_path / "scene.png")
    Image.fromarray(disc.astype(np.uint8) * 255).save(tmp_path / "mask.png")
    res = cli("move", tmp_path / "scene.png", "--mask", tmp_path / "mask.png", "--offset", "16,0", "--dry-run",
              *FAST)
    assert res.returncode == 0, res.stderr
    assert "note: image: 'RGBA' image with transparency: flattened onto white" in res.stderr
    assert "InputNote" not in res.stderr and ".py:" not in res.stderr


def test_dry_run_refuses_what_the_edit_would_refuse(tmp_path):
    """--dry-run runs every geometry check of the edit, on the model's grid, without loading the model."""
    from PIL import Image

    from conftest import make_scene
    from test_cli import FAST, cli

    img, disc, _ = make_scene()
    Image.fromarray(img).save(tmp_path / "scene.png")
    Image.fromarray(disc.astype(np.uint8) * 255).save(tmp_path / "mask.png")
    base = ["--mask", tmp_path / "mask.png", "--dry-run", *FAST]
    res = cli("move", tmp_path / "scene.png", "--offset", "0,0", *base)
    assert res.returncode == 2 and "offset=(0, 0) with scale=1 is not an edit" in res.stderr
    res = cli("move", tmp_path / "scene.png", "--offset", "500,0", *base)
    assert res.returncode == 2 and "outside the image" in res.stderr
    res = cli("drag", tmp_path / "scene.png", "--points", "36,44:37,44", *base)
    assert res.returncode == 2 and "same 4-px feature cell" in res.stderr
    res = cli("move", tmp_path / "scene.png", "--offset", "16,0", *base)
    assert res.returncode == 0 and "valid" in res.stdout
