"""Outputs of `batch` and the edit commands (issue: new-user probe): nothing that dragondiff did not write is
replaced without --overwrite, no two edits write one file, an unwritable output is refused before the model loads
and by the user's path, an interrupted run leaves no temporary files and says what finished, and a batch folder may
hold files that are not edits."""

import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import make_scene
from test_cli import FAST, cli

SPEC = {"task": "move", "image": "scene.png", "mask": "disc.png", "offset": [16, 0], "num_inference_steps": 2,
        "max_resolution": 128}


def _scene(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    img, disc, _ = make_scene()
    Image.fromarray(img).save(folder / "scene.png")
    Image.fromarray(disc.astype(np.uint8) * 255).save(folder / "disc.png")


def _sample(folder: Path) -> None:
    """A DragBench-layout sample: original_image.png and meta_data.pkl."""
    folder.mkdir(parents=True)
    img, _, _ = make_scene()
    Image.fromarray(img).save(folder / "original_image.png")
    mask = np.zeros((128, 128), np.uint8)
    mask[20:80, 20:110] = 1
    with open(folder / "meta_data.pkl", "wb") as f:
        pickle.dump({"prompt": "a red disc", "points": [(40, 44), (60, 44)], "mask": mask}, f)


def _files(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------ 1: files dragondiff did not write

def test_batch_refuses_files_it_did_not_write(tmp_path):
    """Another method's dragged_image.png (no sidecar) and a stray editable_mask.png are not replaced without
    --overwrite; every such sample is listed before any model work. A job whose sidecar is dragondiff's may have its
    own files replaced (resume)."""
    root, out = tmp_path / "bench", tmp_path / "out"
    for name in ("cat/a", "cat/b", "cat/c"):
        _sample(root / name)
    (out / "cat/a").mkdir(parents=True)
    (out / "cat/a/dragged_image.png").write_bytes(b"another method's result")
    (out / "cat/b").mkdir(parents=True)
    (out / "cat/b/editable_mask.png").write_bytes(b"someone's mask")
    (out / "cat/c").mkdir(parents=True)  # ours: a sidecar, its image gone: may be redone
    (out / "cat/c/dragged_image.json").write_text(json.dumps({"dragondiff": "0.1.0", "spec": {}}))
    (out / "cat/c/editable_mask.png").write_bytes(b"our mask")
    before = _files(out)
    res = cli("batch", root, "-o", out, *FAST)
    assert res.returncode == 2, res.stderr
    assert "cat/a: output" in res.stderr and "cat/b: output" in res.stderr and "cat/c" not in res.stderr
    assert "not written by dragondiff" in res.stderr and "--overwrite" in res.stderr
    assert _files(out) == before  # nothing replaced, nothing added
    res = cli("batch", root, "-o", out, "--overwrite", "--dry-run", *FAST)
    assert res.returncode == 0 and res.stdout.count(": valid") == 3, res.stderr


# ------------------------------------------------------------------------------ 2: two jobs, one output

def test_batch_checks_every_output_against_every_other(tmp_path):
    """a.json and a.yaml would both write OUT/a.png; a spec reading a file a sample writes is refused too."""
    root, out = tmp_path / "in", tmp_path / "in" / "out"
    _scene(root)
    (root / "a.json").write_text(json.dumps(SPEC))
    (root / "a.yaml").write_text("task: move\nimage: scene.png\nmask: disc.png\noffset: [20, 0]\n")
    res = cli("batch", root, "-o", out, "--dry-run", *FAST)
    assert res.returncode == 2, res.stdout + res.stderr
    assert f"{out / 'a.png'} is also written by" in res.stderr and "a.json" in res.stderr, res.stderr
    (root / "a.yaml").unlink()
    # edit.json reads the mask the sample cat/s writes beside its result
    _sample(root / "cat/s")
    (out / "cat/s").mkdir(parents=True)
    Image.open(root / "disc.png").save(out / "cat/s/editable_mask.png")
    (root / "edit.json").write_text(json.dumps({**SPEC, "mask": "out/cat/s/editable_mask.png"}))
    res = cli("batch", root, "-o", out, "--dry-run", "--overwrite", *FAST)
    assert res.returncode == 2, res.stdout + res.stderr
    assert f"{out / 'cat/s/editable_mask.png'} is read by edit.json" in res.stderr, res.stderr


# ------------------------------------------------------------------------------ 8: interrupted writes

class _Interrupted:
    """An image whose save writes half a file, then is interrupted (Ctrl-C) or fails (disk full)."""

    def __init__(self, error):
        self.error = error

    def save(self, fp, format=None):
        Path(fp).write_bytes(b"half")
        raise self.error


@pytest.mark.parametrize("error", [KeyboardInterrupt(), OSError(28, "No space left on device")])
def test_atomic_write_removes_its_temp_file(tmp_path, error):
    from dragondiff.cli.runner import InputError, save_image

    target = tmp_path / "x.png"
    with pytest.raises(KeyboardInterrupt if isinstance(error, KeyboardInterrupt) else InputError) as info:
        save_image(_Interrupted(error), target)
    assert list(tmp_path.iterdir()) == []
    if isinstance(error, OSError):  # named by the user's path, never the temporary file; exit code 2
        message = info.value.format_message()
        assert f"cannot write {target} (No space left on device)" == message and info.value.exit_code == 2


_KILL_ON_SAVE = """
import os, signal, sys, time
# a test runner's worker process may ignore SIGINT, and a child inherits that: restore what a terminal gives
signal.signal(signal.SIGINT, signal.default_int_handler)
from PIL import Image
from dragondiff.cli.runner import temp_path
original = Image.Image.save
def save(self, fp, *args, **kwargs):
    if os.path.basename(str(fp)) == temp_path({prefix!r}).name:
        with open(fp, "wb") as f:
            f.write(b"half")
        os.kill(os.getpid(), {signal})
        time.sleep(10)
    return original(self, fp, *args, **kwargs)
Image.Image.save = save
from dragondiff.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _cli_killed_on_save(name, sig, *args, cwd=None):
    """The CLI, sent `sig` by itself while it writes the temporary file of the output named `name`."""
    script = _KILL_ON_SAVE.format(prefix=name, signal=int(sig))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_batch_interrupted_cleans_up_and_says_what_finished(tmp_path, sig, code):
    root, out = tmp_path / "in", tmp_path / "out"
    _scene(root)
    for name in ("a", "b", "c"):
        (root / f"{name}.json").write_text(json.dumps(SPEC))
    res = _cli_killed_on_save("b.png", sig, "batch", root, "-o", out, *FAST)
    assert res.returncode == code, res.stderr
    assert "batch interrupted: 1 edited, 2 left" in res.stderr, res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["a.json", "a.png"]  # no temp file, no half-done b
    if sig == signal.SIGTERM:  # resume: a is skipped, b and c are done
        res = cli("batch", root, "-o", out, *FAST[:-1])
        assert res.returncode == 0 and "2 edited, 1 already done" in res.stdout, res.stderr


def test_edit_interrupted_cleans_up(tmp_path):
    _scene(tmp_path)
    res = _cli_killed_on_save("moved.png", signal.SIGINT, "move", "scene.png", "--mask", "disc.png", "--offset",
                              "16,0", "-o", "moved.png", *FAST, cwd=tmp_path)
    assert res.returncode == 130 and "interrupted" in res.stderr, res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disc.png", "scene.png"]


# ------------------------------------------------------------------------------ 9: unwritable outputs

@pytest.mark.parametrize("output", ["/proc/x.png", "/sys/x.png"])
@pytest.mark.parametrize("dry_run", [True, False])
def test_unwritable_output_is_refused_before_the_model_by_its_path(tmp_path, output, dry_run):
    _scene(tmp_path)
    res = cli("move", "scene.png", "--mask", "disc.png", "--offset", "16,0", "-o", output, *FAST,
              *(["--dry-run"] if dry_run else []), cwd=tmp_path)
    assert res.returncode == 2, res.stdout + res.stderr
    assert f"cannot write {output}" in res.stderr and ".tmp" not in res.stderr, res.stderr


def test_batch_into_an_unwritable_folder_is_refused_before_the_model(tmp_path):
    root = tmp_path / "in"
    _sample(root / "cat/s")
    res = cli("batch", root, "-o", "/sys/dragondiff-out", *FAST)
    assert res.returncode == 2, res.stderr
    assert "--output: cannot write /sys/dragondiff-out" in res.stderr and "failed" not in res.stderr, res.stderr


def test_write_check_tries_and_leaves_nothing(tmp_path):
    """The check creates missing folders as the write would, and removes them again, also when it fails."""
    from dragondiff.cli.runner import InputError, check_output

    check_output(tmp_path / "new" / "deeper" / "x.png", overwrite=False)
    assert list(tmp_path.iterdir()) == []
    bad = tmp_path / "new" / ("n" * 300) / "x.png"  # the first folder can be made, the second cannot
    with pytest.raises(InputError, match="cannot write") as info:
        check_output(bad, overwrite=False)
    assert str(bad) in info.value.format_message()
    assert list(tmp_path.iterdir()) == []


def test_write_error_after_the_model_names_the_users_path():
    from dragondiff.cli.runner import InputError, save_image, save_json

    with pytest.raises(InputError) as info:
        save_image(Image.new("RGB", (4, 4)), Path("/proc/x.png"))
    assert "cannot write /proc/x.png" in info.value.format_message() and ".tmp" not in info.value.format_message()
    with pytest.raises(InputError, match="cannot write /sys/x.json"):
        save_json({"a": 1}, Path("/sys/x.json"))


# ------------------------------------------------------------------------------ 19: batch's folders and files

@pytest.mark.parametrize("where", ["same", "parent"])
def test_batch_output_must_be_outside_the_input_folder(tmp_path, where):
    root = tmp_path / "in"
    _sample(root / "cat/s")
    res = cli("batch", root, "-o", root if where == "same" else tmp_path, "--dry-run", *FAST)
    assert res.returncode == 2 and "--output" in res.stderr and "outside DIR" in res.stderr, res.stderr


def test_batch_skips_json_and_yaml_that_are_not_edits(tmp_path):
    root = tmp_path / "in"
    _scene(root)
    (root / "edit.json").write_text(json.dumps(SPEC))
    (root / "node_modules/pkg").mkdir(parents=True)
    (root / "node_modules/pkg/package.json").write_text(json.dumps({"name": "pkg", "version": "1.0.0"}))
    (root / "config.yaml").write_text("name: x\nitems: [1, 2]\n")
    (root / "numbers.json").write_text("[1, 2, 3]")
    res = cli("batch", root, "-o", tmp_path / "out", "--dry-run", *FAST)
    assert res.returncode == 0, res.stderr
    assert "edit.json: valid" in res.stdout
    for name in ("node_modules/pkg/package.json", "config.yaml", "numbers.json"):
        assert f"note: skipped {name}: not an edit spec" in res.stderr, res.stderr
    assert res.stderr.count("note:") == 3


def _option_help(command: str, option: str) -> str:
    """The --help text of one option of a command (its lines up to the next option)."""
    from dragondiff.cli import cli as group

    lines = CliRunner().invoke(group, [command, "--help"]).output.splitlines()
    start = next(k for k, line in enumerate(lines) if line.strip().startswith(option))
    end = next((k for k in range(start + 1, len(lines)) if lines[k].strip().startswith("-")), len(lines))
    return " ".join(line.strip() for line in lines[start:end])


def test_batch_help_calls_output_a_folder():
    text = _option_help("batch", "-o, --output")
    assert "folder" in text and "output image" not in text, text
    assert "output image" in _option_help("move", "-o, --output")
