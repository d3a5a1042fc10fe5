"""The command line through its installed entry point, on the tiny model saved in tests/data (2 DDIM steps)."""

import dataclasses
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import TINY_MODEL, make_scene

EXE = Path(sys.executable).parent / "dragondiff"
FAST = ["--model", str(TINY_MODEL), "--steps", "2", "--max-resolution", "128", "--threads", "1", "-q"]


def cli(*args, cwd=None, env=None):
    exe = str(EXE) if EXE.exists() else shutil.which("dragondiff")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


@pytest.fixture
def files(tmp_path):
    """An odd-sized scene (150x130) with the disc's mask, and a reference image with the square's mask."""
    img, disc, square = make_scene(size=128)
    big = Image.fromarray(img).resize((150, 130), Image.LANCZOS)
    big.save(tmp_path / "scene.png")
    to_mask = lambda m: Image.fromarray(m.astype(np.uint8) * 255).resize((150, 130), Image.NEAREST)  # noqa: E731
    to_mask(disc).save(tmp_path / "disc.png")
    to_mask(square).save(tmp_path / "square.png")
    editable = np.zeros((130, 150), np.uint8)
    editable[20:90, 10:100] = 255
    Image.fromarray(editable).save(tmp_path / "editable.png")
    return tmp_path


def read(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_version_help_info():
    out = cli("--version")
    assert out.returncode == 0 and "0.1.0" in out.stdout
    out = cli("move", "--help")
    assert out.returncode == 0
    for option in ("--mask", "--offset", "--scale", "--w-contrast", "--threads", "--overwrite", "[default: 4]"):
        assert option in out.stdout, option
    out = cli("info", "--json", "--model", TINY_MODEL)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["threads"] >= 1 and "cores available" in info["threads_reason"]
    assert info["versions"]["torch"] and len(info["model"]["sha256"]) == 64


def test_move_full_resolution_sidecar_preview(files):
    out = cli("move", files / "scene.png", "--mask", files / "disc.png", "--offset", "-20,10", "--preview",
              "-o", files / "moved.png", *FAST)
    assert out.returncode == 0, out.stderr
    result, original = read(files / "moved.png"), read(files / "scene.png")
    assert result.shape == original.shape  # the input's own size, not the 128 px working size
    changed = (result != original).any(-1)
    assert changed.any()
    # Untouched pixels are bit-identical: everything far from the disc and its destination (disc at x 30-55,
    # y 36-60 in the 150x130 image; moved by -20, +10; edit area grown by a few px and feathered).
    far = np.ones_like(changed)
    far[10:90, 0:80] = False
    assert not changed[far].any()
    side = json.loads((files / "moved.json").read_text())
    assert side["spec"]["task"] == "move" and side["spec"]["offset"] == [-20.0, 10.0]
    assert side["spec"]["image"] == "scene.png"  # relative to the sidecar: the folder can move
    assert side["model"]["id"] == str(TINY_MODEL) and len(side["model"]["sha256"]) == 64
    assert side["output"]["full_resolution"] and side["output"]["size"] == [150, 130]
    assert {"load", "inversion", "sampling", "decode", "save"} <= set(side["seconds"])
    assert side["threads"] == 1 and side["dtype"] == "float32"
    preview = Image.open(files / "moved-preview.png")
    assert preview.height == 128 and preview.width > 2 * 128


def test_working_size_and_no_overwrite(files):
    target = files / "out.png"
    target.write_bytes(b"keep me")
    out = cli("move", files / "scene.png", "--mask", files / "disc.png", "--offset", "16,0", "-o", target, *FAST)
    assert out.returncode == 2 and "exists" in out.stderr and "--overwrite" in out.stderr
    assert target.read_bytes() == b"keep me"
    out = cli("move", files / "scene.png", "--mask", files / "disc.png", "-o", target, "--working-size", "--scale", "1.2",
              "--overwrite", *FAST)
    assert out.returncode == 0, out.stderr
    assert Image.open(target).size == (128, 128)  # working size for a 150x130 image at max_resolution 128
    out = cli("move", files / "scene.png", "--mask", files / "disc.png", "--offset", "16,0", "-o", files / "scene.png",
              "--overwrite", *FAST)
    assert out.returncode == 2 and "own inputs" in out.stderr


@pytest.mark.parametrize("task, args", [
    ("drag", ["--mask", "editable.png", "--points", "40,48:60,48", "--points", "45,60:65,60 30,40:30,50"]),
    ("appearance", ["--mask", "disc.png", "--reference", "scene.png", "--reference-mask", "square.png"]),
    ("paste", ["--reference", "scene.png", "--reference-mask", "square.png", "--offset", "-60,-20", "--scale", "0.8"]),
])
def test_other_tasks(files, task, args):
    out = cli(task, "scene.png", *args, *FAST, cwd=files)
    assert out.returncode == 0, out.stderr
    assert read(files / f"scene-{task}.png").shape == (130, 150, 3)
    side = json.loads((files / f"scene-{task}.json").read_text())
    assert side["spec"]["task"] == task
    if task == "drag":
        assert len(side["spec"]["points"]) == 3


def test_usage_errors_exit_2(files):
    cases = [
        (["move", "scene.png", "--mask", "disc.png", "--offset", "1,2,3"], "--offset"),
        (["move", "scene.png", "--mask", "nothere.png", "--dry-run"], "mask: file not found"),
        (["move", "scene.png", "--mask", "disc.png", "--scale", "0", "--dry-run"], "scale must be in"),
        (["drag", "scene.png", "--mask", "editable.png", "--points", "40,48"], "handle:target"),
        (["drag", "scene.png", "--mask", "editable.png", "--points", "40,48:900,48", "--dry-run"], "target"),
        (["move", "scene.png", "--mask", "square.png", "--offset", "16,0", "--device", "gpu"], "device"),
        (["move", "scene.png", "--mask", "disc.png", "--offset", "16,0", "--model", "no-such-folder/x", "--threads", "1"],
         "--model"),
    ]
    for args, needle in cases:
        out = cli(*args, cwd=files)
        assert out.returncode == 2, (args, out.stderr)
        assert needle in out.stderr and "Traceback" not in out.stderr, (args, out.stderr)
    assert not list(files.glob("scene-*.png"))  # nothing was written by a failed command


def test_run_spec_files_and_sidecar_reproduces(files):
    specs = {"edits": [
        {"task": "move", "image": "scene.png", "mask": "disc.png", "offset": [20, 0], "num_inference_steps": 2,
         "max_resolution": 128},
        {"task": "move", "image": "scene.png", "mask": "disc.png", "offset": [-14, 6], "num_inference_steps": 2,
         "max_resolution": 128},
        {"task": "paste", "image": "scene.png", "reference": "scene.png", "reference_mask": "square.png",
         "offset": [-50, 0], "num_inference_steps": 2, "max_resolution": 128},
    ]}
    (files / "specs").mkdir()
    (files / "specs" / "two.json").write_text(json.dumps(specs).replace('"scene.png"', '"../scene.png"')
                                              .replace('"disc.png"', '"../disc.png"')
                                              .replace('"square.png"', '"../square.png"'))
    out = cli("run", files / "specs" / "two.json", "-o", files / "res", "--model", TINY_MODEL, "--threads", "1", "-q")
    assert out.returncode == 0, out.stderr
    first = read(files / "res" / "two-0.png")
    assert (files / "res" / "two-2.png").exists()
    # the two moves of scene.png shared one inversion; the paste (two images) inverted its own
    seconds = [json.loads((files / "res" / f"two-{k}.json").read_text())["seconds"]["inversion"] for k in range(3)]
    assert seconds[0] == seconds[1] == 0 < seconds[2], seconds
    # the sidecar re-runs the edit (its own model id) and gives the same image, shared inversion or not
    for k in (0, 1):
        out = cli("run", files / "res" / f"two-{k}.json", "-o", files / f"again-{k}.png", "--threads", "1", "-q")
        assert out.returncode == 0, out.stderr
        assert np.array_equal(read(files / f"again-{k}.png"), read(files / "res" / f"two-{k}.png"))
    assert not np.array_equal(read(files / "again-1.png"), first)
    # YAML works too
    (files / "one.yaml").write_text("task: move\nimage: scene.png\nmask: disc.png\noffset: [10, 5]\n"
                                    "num_inference_steps: 2\nmax_resolution: 128\n")
    out = cli("run", "one.yaml", "--dry-run", cwd=files)
    assert out.returncode == 0 and "valid" in out.stdout, out.stderr


def test_run_dry_run_errors_point_at_the_field(files):
    (files / "bad.json").write_text(json.dumps([
        {"task": "move", "image": "scene.png", "mask": "disc.png"},
        {"task": "move", "image": "scene.png", "mask": "disc.png", "offest": [1, 2]},
    ]))
    out = cli("run", "bad.json", "--dry-run", cwd=files)
    assert out.returncode == 2 and "bad.json[1]: offest: unknown field" in out.stderr, out.stderr
    (files / "bad2.json").write_text(json.dumps({"task": "drag", "image": "scene.png", "mask": "editable.png",
                                                 "points": [[[40, 48], [60]]]}))
    out = cli("run", "bad2.json", "--dry-run", cwd=files)
    assert out.returncode == 2 and "points[0]" in out.stderr, out.stderr
    (files / "bad3.json").write_text("{not json")
    out = cli("run", "bad3.json", "--dry-run", cwd=files)
    assert out.returncode == 2 and "not valid JSON" in out.stderr


def _sample(folder: Path, size, points, mask_box, image=True):
    folder.mkdir(parents=True)
    img, _, _ = make_scene(size=128)
    if image:
        Image.fromarray(img).resize(size, Image.LANCZOS).save(folder / "original_image.png")
    mask = np.zeros((size[1], size[0]), np.uint8)
    y0, y1, x0, x1 = mask_box
    mask[y0:y1, x0:x1] = 1
    with open(folder / "meta_data.pkl", "wb") as f:
        pickle.dump({"prompt": "a red disc", "points": points, "mask": mask}, f)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_batch_dragbench_resume_and_failures(tmp_path):
    root = tmp_path / "bench"
    _sample(root / "cat_a" / "odd", (150, 98), [(44, 50), (60, 50)], (20, 80, 20, 120))
    _sample(root / "cat_a" / "tall", (90, 170), [(30, 60), (40, 70), (50, 90), (55, 95)], (30, 140, 10, 80))
    _sample(root / "cat_b" / "no_image", (128, 128), [(44, 50), (60, 50)], (20, 80, 20, 120), image=False)
    _sample(root / "cat_b" / "odd_points", (128, 128), [(44, 50), (60, 50), (1, 1)], (20, 80, 20, 120))
    marker = tmp_path / "PWNED"
    evil = root / "cat_b" / "evil"
    evil.mkdir()
    Image.new("RGB", (64, 64)).save(evil / "original_image.png")
    (evil / "meta_data.pkl").write_bytes(pickle.dumps({"prompt": "x", "points": _Evil(marker), "mask": None}))
    out_dir = tmp_path / "out"
    out = cli("batch", root, "-o", out_dir, "--steps", "2", "--model", TINY_MODEL, "--threads", "1", "-q")
    assert out.returncode == 1
    assert not marker.exists()  # the malicious pickle ran nothing
    for name in ("cat_a/odd", "cat_a/tall"):
        result = read(out_dir / name / "dragged_image.png")
        assert result.shape[:2] == read(root / name / "original_image.png").shape[:2]
        side = json.loads((out_dir / name / "dragged_image.json").read_text())
        assert side["spec"]["task"] == "drag" and side["spec"]["prompt"] == "a red disc"
    failed = out.stderr
    assert "cat_b/no_image" in failed and "no original_image.png" in failed
    assert "cat_b/odd_points" in failed and "even" in failed
    assert "cat_b/evil" in failed and "refuses to load" in failed and "system" in failed
    assert "2 edited" in failed and "3 failed" in failed
    # resume: finished samples are skipped and left as they were
    stamp = (out_dir / "cat_a/odd/dragged_image.png").stat().st_mtime_ns
    out = cli("batch", root, "-o", out_dir, "--steps", "2", "--model", TINY_MODEL, "--threads", "1", "-q")
    assert out.returncode == 1 and "0 edited, 2 already done" in out.stderr
    assert (out_dir / "cat_a/odd/dragged_image.png").stat().st_mtime_ns == stamp
    # a batch sidecar re-runs its sample (the mask was written beside it)
    out = cli("run", out_dir / "cat_a/odd/dragged_image.json", "-o", tmp_path / "again.png", "--threads", "1", "-q")
    assert out.returncode == 0, out.stderr
    assert np.array_equal(read(tmp_path / "again.png"), read(out_dir / "cat_a/odd/dragged_image.png"))


def test_restricted_unpickler_library():
    from dragondiff import dragbench

    mask = np.eye(4, dtype=np.uint8)
    data = pickle.dumps({"prompt": "p", "points": [(1.0, 2), (3, 4)], "mask": mask, "n": np.float32(2)})
    meta = dragbench.load_restricted(data)
    assert np.array_equal(meta["mask"], mask) and meta["points"][0] == (1.0, 2)
    for protocol in (2, 5):
        assert np.array_equal(dragbench.load_restricted(pickle.dumps(mask, protocol=protocol)), mask)
    with pytest.raises(dragbench.UnsafePickleError, match="builtins.eval"):
        dragbench.load_restricted(b"cbuiltins\neval\n(S'1+1'\ntR.")


def test_readme_examples_validate():
    """The README's spec file and DragBench folder (examples/) are valid as shipped."""
    root = Path(__file__).parents[1]
    out = cli("run", "examples/edits.json", "--dry-run", cwd=root)
    assert out.returncode == 0 and out.stdout.count("valid") == 2, out.stderr
    out = cli("batch", "examples/dragbench", "-o", "/tmp/dragondiff-never-written", "--dry-run", cwd=root)
    assert out.returncode == 0 and "shapes/circle_right: valid" in out.stdout, out.stderr


def test_task_options_are_derived_from_params_and_limits():
    """Each task command offers exactly its Params fields (plus the shared groups); ranges come from the limits."""
    from click.testing import CliRunner

    from dragondiff.cli import cli as group
    from dragondiff.cli.options import COMMON_SPEC_FIELDS
    from dragondiff.limits import LIMITS
    from dragondiff.tasks import TASKS

    shared = {p.name for p in group.commands["run"].params} | set(COMMON_SPEC_FIELDS) | {"image", "output"}
    for task, info in TASKS.items():
        names = {p.name for p in group.commands[task].params}
        assert names - shared == set(info.params.names()), task
        required = {p.name for p in group.commands[task].params if p.required} - {"image"}
        assert required == {f.name for f in info.params.fields() if f.default is dataclasses.MISSING}, task
    steps = next(p for p in group.commands["move"].params if p.name == "steps")
    assert (steps.type.min, steps.type.max) == (LIMITS["num_inference_steps"].low, LIMITS["num_inference_steps"].high)
    text = CliRunner().invoke(group, ["move", "--help"]).output
    assert "[default: 50]" not in text and "fast 20" in text and "fast:" in text
