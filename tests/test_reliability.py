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
        with pytest.raises(dragbench.UnsafePickleError,
                           match=r"3,200,000,000 bytes \(40000 x 40000 of float16\).*nothing was allocated"):
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
    with pytest.raises(dragbench.UnsafePickleError, match="at most 16,384 bytes"):
        dragbench.load_restricted(pickle.dumps(_ArrayBomb()), "x", max_bytes=16_384)


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
    from dragondiff.planning import plan_edit
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


# ------------------------------------------------------------------------- the command line, in this process

@pytest.fixture
def main(monkeypatch, capsys):
    """`dragondiff ARGS...` run in this process (no model loads in these tests): (exit code, stdout, stderr)."""
    import warnings

    from dragondiff.cli import main as cli_main

    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # main() replaces it; put it back after

    def run(*args):
        capsys.readouterr()
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            code = cli_main([str(a) for a in args])
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def _scene_files(folder):
    from PIL import Image

    from conftest import make_scene

    img, disc, _ = make_scene()
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(folder / "scene.png")
    Image.fromarray(disc.astype(np.uint8) * 255).save(folder / "disc.png")
    return folder


def test_spec_files_are_bounded_before_validating(tmp_path, main):
    """A YAML alias bomb, a deeply nested and an oversized spec file are refused by name, with little memory."""
    from conftest import TINY_MODEL
    from dragondiff import documents

    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("task: move\nimage: scene.png\nmask: disc.png\n" + _alias_bomb())
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="more than 200,000 values"):
            documents.read(bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20
    code, _, err = main("run", bomb, "--dry-run", "--model", TINY_MODEL)
    assert code == 2 and "bomb.yaml: holds more than 200,000 values" in err and len(err) < 600
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 40 + "]" * 40)
    code, _, err = main("run", deep, "--dry-run")
    assert code == 2 and "nested deeper than 32 levels" in err
    big = tmp_path / "big.json"
    big.write_text('{"task": "move", "prompt": "' + "x" * documents.SPEC_FILE_BYTES + '"}')
    code, _, err = main("run", big, "--dry-run")
    assert code == 2 and "big.json: larger than 4 MiB" in err


def _sidecar_copy(tmp_path, **model):
    import json
    import shutil
    from pathlib import Path

    src = Path(__file__).parent / "data" / "sidecars"
    for name in ("scene.png", "circle.png"):
        shutil.copy(src / name, tmp_path / name)
    data = json.loads((src / "move.json").read_text())
    data["model"] = model.get("model", {**data["model"], **model})
    path = tmp_path / "edit" / "move.json"
    path.parent.mkdir(exist_ok=True)
    for name in ("scene.png", "circle.png"):  # the sidecar's paths are relative to its folder
        shutil.copy(src / name, path.parent / name)
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("model, message", [("tiny", r'model: expected an object like \{"id": \.\.\.'),
                                            ({"id": 123}, "model.id: expected a model id or path"),
                                            ({"id": "x", "sha256": 5}, "model.sha256: expected a string")])
def test_a_malformed_sidecar_model_is_named(tmp_path, main, model, message):
    import re

    sidecar = _sidecar_copy(tmp_path, model=model)
    code, _, err = main("run", sidecar, "--dry-run")
    assert code == 2 and re.search(message, err), err


def test_rerunning_a_sidecar_on_changed_weights_is_refused(tmp_path, main):
    from dragondiff.shapes import model as shapes_model

    if not shapes_model.is_available():
        pytest.skip("the bundled model's weights are not installed")
    same = _sidecar_copy(tmp_path)
    code, out, err = main("run", same, "--dry-run", "-o", tmp_path / "a.png")
    assert code == 0 and "valid" in out, err
    changed = _sidecar_copy(tmp_path, sha256="0" * 64)
    code, _, err = main("run", changed, "--dry-run", "-o", tmp_path / "a.png")
    assert code == 2 and "weights changed since the sidecar was written (sha256 000000000000… recorded" in err
    assert "--model dragondiff:shapes" in err
    code, out, err = main("run", changed, "--dry-run", "-o", tmp_path / "a.png", "--model", "dragondiff:shapes")
    assert code == 0 and "note: --model dragondiff:shapes: other weights than the sidecar recorded" in err


def test_run_from_the_spec_folder_never_writes_over_the_spec(tmp_path, main, monkeypatch):
    import json

    from conftest import TINY_MODEL

    _scene_files(tmp_path)
    spec = tmp_path / "edit.json"
    text = json.dumps({"task": "move", "image": "scene.png", "mask": "disc.png", "offset": [16, 0]})
    spec.write_text(text)
    monkeypatch.chdir(tmp_path)
    code, out, err = main("run", "edit.json", "--dry-run", "--model", TINY_MODEL)
    assert code == 0 and "edit-out.png" in out, err
    code, _, err = main("run", "edit.json", "-o", "edit.png", "--overwrite", "--dry-run", "--model", TINY_MODEL)
    assert code == 2 and "edit.json is one of the edit's own inputs" in err and "--overwrite" not in err
    assert spec.read_text() == text


def test_spec_paths_resolve_beside_the_real_file_and_stdin_is_read_once(tmp_path, main):
    """A symlinked spec's relative paths are the target's; an image streamed through a pipe (read by the check,
    the edit and the compositing) is read once and kept."""
    import json
    import os

    from conftest import TINY_MODEL
    from dragondiff.inputs import load_image

    real = _scene_files(tmp_path / "project")
    (real / "edit.json").write_text(json.dumps({"task": "move", "image": "scene.png", "mask": "disc.png",
                                                "offset": [16, 0]}))
    (tmp_path / "links").mkdir()
    os.symlink(real / "edit.json", tmp_path / "links" / "edit.json")
    code, out, err = main("run", tmp_path / "links" / "edit.json", "--dry-run", "--model", TINY_MODEL, "-o",
                          tmp_path / "out.png")
    assert code == 0 and "valid" in out, err
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    data = (real / "scene.png").read_bytes()
    pid = os.fork()
    if pid == 0:  # the writer: one pass, then the pipe is closed
        with open(fifo, "wb") as f:
            f.write(data)
        os._exit(0)
    first, second = load_image(str(fifo)), load_image(str(fifo))
    os.waitpid(pid, 0)
    assert np.array_equal(first, second) and np.array_equal(first, load_image(real / "scene.png"))


def test_small_command_line_findings(tmp_path, main):
    from conftest import TINY_MODEL

    code, out, _ = main("bench", "--help")
    assert code == 0 and "bench speed" in out
    code, out, _ = main()
    assert code == 0 and "Commands:" in out
    code, _, err = main("info", "--model", tmp_path / "nonexistent")
    assert code == 2 and "--model" in err and "no such file or folder" in err
    _scene_files(tmp_path)
    base = [tmp_path / "scene.png", "--mask", tmp_path / "disc.png", "--dry-run", "--model", TINY_MODEL]
    for offset in ("+10,0", ".5,0", "-.5,+3."):
        code, out, err = main("move", *base, "--offset", offset, "-o", tmp_path / "a.png")
        assert code == 0, (offset, err)
    code, _, err = main("move", *base, "--offset", "16,0", "--steps", "1000", "-o", tmp_path / "a.jpg")
    assert code == 0 and "a.jpg: .jpg is lossy" in err
    code, _, err = main("move", *base[:-3], "--offset", "16,0", "--model", "missing/model", "-o", tmp_path / "a.png")
    assert code == 2 and "no such local folder; as a hub id it is neither cached here nor reachable" in err
    assert "note:" not in err  # the hub client's own deprecation warnings are not printed as notes


def test_large_outputs_blend_at_a_coarse_size_with_the_same_guarantees():
    """Past a 16-px margin the ramp is built smaller and resized: still 1 on the edit area, exactly 0 beyond
    the dilation plus the blur (three margins), and close to the full-size ramp."""
    from dragondiff.output import _ramp, blend_weights

    area = np.zeros((48, 64), bool)
    area[20:30, 20:40] = True
    h, w = 1200, 1600  # margin 48 px
    alpha = blend_weights(area, (h, w))
    grid = np.kron(area, np.ones((25, 25), bool))
    assert alpha[grid].min() == 1.0
    ys, xs = np.nonzero(grid)
    assert alpha[: ys.min() - 3 * 48].max() == 0 and alpha[:, xs.max() + 3 * 48:].max() == 0
    full = _ramp(area, (h, w), 48)
    full[full < 1 / 512] = 0
    ramp = (full > 0) | (alpha > 0)
    assert np.abs(alpha - full)[ramp].mean() < 0.02  # the ramp's hard edge moves by up to one coarse pixel


def test_the_preview_shows_the_saved_image():
    from PIL import Image

    from dragondiff.output import preview
    from dragondiff.result import EditResult

    working = Image.new("RGB", (64, 64), (255, 0, 0))
    saved = Image.new("RGB", (200, 200), (0, 0, 255))
    result = EditResult(image=working, task="move", preset="official", input_image=Image.new("RGB", (64, 64)),
                        reference_image=None, masks={}, edit_area=None, input_scale=(1.0, 1.0), energies=[],
                        pass_counts={})
    sheet = np.asarray(preview(result, saved))
    assert sheet.shape[:2] == (64, 64 * 2 + 4)
    assert tuple(sheet[32, -10]) == (0, 0, 255)


def test_guidance_factors_are_bounded_and_the_nan_hint_names_them(tiny_pipe, main):
    """--gradient-coef 1e30 is refused by its range; a latent that turns NaN names every factor of the guidance
    strength (not only one of them)."""
    import torch

    from conftest import FAST, TINY_MODEL, make_scene
    from dragondiff.errors import NonFiniteError

    code, _, err = main("move", "x.png", "--mask", "m.png", "--offset", "8,0", "--gradient-coef", "1e30",
                        "--model", TINY_MODEL)
    assert code == 2 and "--gradient-coef" in err and "is not in the range 0<=x<=10" in err
    img, disc, _ = make_scene()
    poison = lambda pipe, i, t, kw: {"latents": torch.full_like(kw["latents"], float("nan"))}  # noqa: E731
    with pytest.raises(NonFiniteError, match=r"energy_scale, gradient_coef and the energy weights \(w_edit"):
        tiny_pipe.move(img, disc, offset=(16, 0), callback_on_step_end=poison, **dict(FAST, num_inference_steps=3))
    code, out, _ = main("move", "--help")
    assert "[default: 0,0: no move, so give it unless --scale resizes in place]" in " ".join(out.split())
