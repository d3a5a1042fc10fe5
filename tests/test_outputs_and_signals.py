"""Nothing the user owns is lost, and a signal always stops the command (issue 28, probe 4: findings 4, 6, 10, 11,
14): --overwrite replaces a file only once the new edit is written, output names are checked with what is really
written (temporary names included), convert-ip-adapter makes its folders, batch says which samples -o hides, and
Ctrl-C/SIGTERM at any moment, start-up included, exits 130/143 with nothing half-written."""

import gc
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import DATA
from test_cli import FAST, cli
from test_reliability_batch import SPEC, _files, _sample, _scene

# ------------------------------------------------------------------------------ finding 4: a failed edit keeps files


def _batch_in_process(*args) -> int:
    from dragondiff.cli import main

    return main([str(a) for a in args])


def _users_files(out: Path) -> dict:
    folder = out / "cat/s"
    folder.mkdir(parents=True)
    (folder / "editable_mask.png").write_bytes(b"USER MASK")
    (folder / "dragged_image.png").write_bytes(b"OTHER RESULT")
    return _files(out)


@pytest.mark.parametrize("where", ["edit", "preview"])
def test_batch_overwrite_keeps_the_users_files_when_the_edit_fails(tmp_path, monkeypatch, capsys, where):
    """The edit fails (`edit`), or a file fails while the results are written (`preview`, written after the mask
    and the image): the user's editable_mask.png and dragged_image.png are still there, unchanged, and no
    temporary file is left. (Before: the mask was written before the edit and removed by the failure's clean-up.)"""
    import dragondiff.output
    import dragondiff.pipeline

    def boom(*args, **kwargs):
        raise RuntimeError("Tensor on device meta is not on the expected device cpu!")

    monkeypatch.setattr(dragondiff.pipeline.DragonPipeline, "edit", boom) if where == "edit" else \
        monkeypatch.setattr(dragondiff.output, "preview", boom)
    root, out = tmp_path / "bench", tmp_path / "out"
    _sample(root / "cat/s")
    before = _users_files(out)
    code = _batch_in_process("batch", root, "-o", out, "--overwrite", "--preview", *FAST)
    assert code == 1 and "failed cat/s: RuntimeError: Tensor on device meta" in capsys.readouterr().err
    assert _files(out) == before


def test_batch_overwrite_replaces_the_users_files_once_the_edit_is_written(tmp_path, capsys):
    root, out = tmp_path / "bench", tmp_path / "out"
    _sample(root / "cat/s")
    _users_files(out)
    assert _batch_in_process("batch", root, "-o", out, "--overwrite", *FAST) == 0, capsys.readouterr().err
    after = _files(out)
    assert sorted(after) == ["cat/s/dragged_image.json", "cat/s/dragged_image.png", "cat/s/editable_mask.png"]
    assert after["cat/s/editable_mask.png"] != b"USER MASK" and after["cat/s/dragged_image.png"] != b"OTHER RESULT"


def test_ray_clean_up_never_removes_a_file_that_was_there(tmp_path):
    """A Ray worker that died mid-edit: its temporary files and the new files it left go, the user's stay."""
    from dragondiff.cli.ray_batch import remove_unfinished
    from dragondiff.cli.runner import Job, temp_path
    from dragondiff.spec import EditSpec

    spec = EditSpec("move", "scene.png", mask=str(tmp_path / "editable_mask.png"), offset=(1, 0))
    job = Job(spec, tmp_path / "dragged_image.png", "s", writes=[(tmp_path / "editable_mask.png", None)])
    (tmp_path / "editable_mask.png").write_bytes(b"USER MASK")  # there before the run
    (tmp_path / "dragged_image.png").write_bytes(b"new, without its sidecar")  # written by the dead worker
    (tmp_path / ".dd-x.tmp").write_bytes(b"another file's")
    dead = temp_path(job.output).name.replace(f"-{os.getpid()}.", "-99999.")  # the dead worker's temporary file
    (tmp_path / dead).write_bytes(b"half")
    remove_unfinished(job, preview=False, existed={tmp_path / "editable_mask.png"})
    assert sorted(p.name for p in tmp_path.iterdir()) == [".dd-x.tmp", "editable_mask.png"]
    assert (tmp_path / "editable_mask.png").read_bytes() == b"USER MASK"


# ------------------------------------------------------------------------------ finding 10: long output names


def test_an_output_name_the_file_system_takes_is_written(tmp_path):
    """A 254-byte name: its temporary file is longer than 255 bytes if named after it; now it is written (the
    temporary names are short), sidecar included."""
    _scene(tmp_path)
    name = "M" * 250 + ".png"
    res = cli("move", "scene.png", "--mask", "disc.png", "--offset", "16,0", "-o", name, *FAST, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / name).is_file() and (tmp_path / ("M" * 250 + ".json")).is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_run_of_a_spec_file_with_a_long_name(tmp_path):
    """`run S.json` writes S-out.png beside the spec: written for a 245-byte stem (253 bytes), refused before the
    model by its path for a 249-byte one (257 bytes: before, it failed after the edit)."""
    _scene(tmp_path)
    for stem in ("S" * 245, "T" * 249):
        (tmp_path / f"{stem}.json").write_text(json.dumps(SPEC))
    model = ["--model", FAST[1], "--threads", "1", "-q"]
    res = cli("run", "S" * 245 + ".json", *model, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / ("S" * 245 + "-out.png")).is_file() and (tmp_path / ("S" * 245 + "-out.json")).is_file()
    res = cli("run", "T" * 249 + ".json", *model, "--model", tmp_path / "no-such-model", cwd=tmp_path)
    assert res.returncode == 2 and f"cannot write {'T' * 249}-out.png (File name too long)" in res.stderr, res.stderr
    assert not list(tmp_path.glob("T*.png"))


def test_a_name_too_long_is_refused_before_the_model_by_its_path(tmp_path):
    """The preview's name (stem + -preview.png) is over 255 bytes: refused with exit code 2 before any model work,
    naming the path (before: a raw OSError from Path.exists, exit code 1); a .png whose sidecar's name is too
    long likewise."""
    _scene(tmp_path)
    name = "P" * 246 + ".png"
    res = cli("move", "scene.png", "--mask", "disc.png", "--offset", "16,0", "-o", name, "--preview", *FAST,
              "--model", tmp_path / "no-such-model", cwd=tmp_path)  # refused before the model is looked at
    assert res.returncode == 2, res.stderr
    assert f"cannot write {'P' * 246}-preview.png (File name too long)" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and "no-such-model" not in res.stderr
    name = "L" * 251 + ".png"  # 255 bytes: legal, but not its sidecar L...L.json
    res = cli("move", "scene.png", "--mask", "disc.png", "--offset", "16,0", "-o", name, *FAST, cwd=tmp_path)
    assert res.returncode == 2 and f"cannot write {'L' * 251}.json (File name too long)" in res.stderr, res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disc.png", "scene.png"]


def test_check_output_names_a_name_too_long(tmp_path):
    from dragondiff.cli.runner import InputError, check_output

    path = tmp_path / ("n" * 300 + ".png")
    with pytest.raises(InputError, match="File name too long") as info:
        check_output(path, overwrite=True)
    assert str(path) in info.value.format_message()
    check_output(tmp_path / ("n" * 251 + ".png"), overwrite=False)  # 255 bytes: legal
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------ finding 11: convert's folders


def test_convert_ip_adapter_makes_the_targets_folders(tmp_path):
    target = tmp_path / "newdir/sub/x.safetensors"
    res = cli("convert-ip-adapter", DATA / "ip-adapter" / "ip_sd15_64.bin", target)
    assert res.returncode == 0 and "resampler, 64 tokens" in res.stdout, res.stderr
    assert sorted(p.name for p in target.parent.iterdir()) == ["x.safetensors"]
    res = cli("convert-ip-adapter", DATA / "ip-adapter" / "ip_sd15_64.bin", "/proc/sub/x.safetensors")
    assert res.returncode == 2 and "cannot write /proc/sub/x.safetensors" in res.stderr, res.stderr


# ------------------------------------------------------------------------------ finding 14: samples under -o


def test_batch_notes_the_samples_it_leaves_out_under_the_output(tmp_path):
    root = tmp_path / "db"
    for name in ("Open/a", "Open/b", "In/c"):
        _sample(root / name)
    res = cli("batch", root, "-o", root / "Open", "--dry-run", *FAST)
    assert res.returncode == 0 and res.stdout.count(": valid") == 1, res.stderr
    assert f"note: left out 2 samples or spec files under --output {root / 'Open'}" in res.stderr, res.stderr
    res = cli("batch", root, "-o", tmp_path / "out", "--dry-run", *FAST)
    assert res.returncode == 0 and "left out" not in res.stderr, res.stderr


# ------------------------------------------------------------------------------ finding 6: signals


class _SignalsItselfWhenCollected:
    """An object whose finalizer sends `sig` to this process: the signal's exception is raised inside `__del__`,
    where Python drops it ("Exception ignored in ...")."""

    def __init__(self, sig):
        self.sig = sig

    def __del__(self):
        os.kill(os.getpid(), self.sig)
        for _ in range(1000):  # the handler runs at one of these instructions
            pass


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_dropped_in_a_finalizer_still_stops_the_batch(tmp_path, monkeypatch, capsys, sig, code):
    """The signal lands in a finalizer while the model loads: the batch edits nothing and exits 130/143 (before:
    the dropped exception let it edit every sample and exit 0)."""
    import dragondiff.cli.runner as runner

    dropped = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: dropped.append(u.exc_type))
    load = runner.load_pipeline

    def load_then_collect(*args, **kwargs):
        pipe = load(*args, **kwargs)
        _SignalsItselfWhenCollected(sig)  # collected at once: its finalizer runs here
        gc.collect()
        return pipe

    monkeypatch.setattr(runner, "load_pipeline", load_then_collect)
    root, out = tmp_path / "db", tmp_path / "out"
    for name in ("cat/a", "cat/b"):
        _sample(root / name)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # a test runner's worker may ignore it
    try:
        assert _batch_in_process("batch", root, "-o", out, *FAST) == code
    finally:
        signal.signal(signal.SIGINT, previous)
    assert dropped and issubclass(dropped[0], KeyboardInterrupt)  # the case: its exception was dropped
    assert not out.exists() or _files(out) == {}
    assert "batch interrupted: 0 edited, 2 left" in capsys.readouterr().err


_START = """
import signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # a test runner's worker may ignore SIGINT
from dragondiff.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _handlers_set(pid: int) -> bool:
    """Whether the process catches SIGTERM (its handlers are set: before that, the signal's default action)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(caught >> (signal.SIGTERM - 1) & 1)


def _signal_batch(root: Path, out: Path, sig, when) -> tuple[int, str]:
    """`dragondiff batch`, sent `sig` `when` seconds after it started, or ("progress") when its progress bar first
    shows. Its handlers are set about 0.2 s after the start (until the interpreter runs our code a signal has its
    default action, and nothing has started); before this change, after the imports (seconds)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    args = ["batch", root, "-o", out, *[a for a in FAST if a != "-q"]]
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", _START, *map(str, args)], stderr=subprocess.PIPE, env=env)
    err = bytearray()
    reader = threading.Thread(target=lambda: [err.extend(chunk) for chunk in iter(lambda: proc.stderr.read1(256),
                                                                                    b"")], daemon=True)
    reader.start()
    if when == "progress":
        deadline = time.monotonic() + 120
        while b"dragondiff batch" not in err and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
    else:
        time.sleep(max(0.0, start + when - time.monotonic()))
    handlers = _handlers_set(proc.pid)
    proc.send_signal(sig)
    code = proc.wait(timeout=120)
    reader.join(timeout=10)
    return code, f"(handlers set when signalled: {handlers})\n" + err.decode(errors="replace")


def _unfinished(out: Path) -> list[str]:
    """Files under `out` that are not part of a finished edit (an image and its mask with their sidecar)."""
    if not out.exists():
        return []
    files = {p.relative_to(out) for p in out.rglob("*") if p.is_file()}
    finished = {p.parent for p in files if p.name == "dragged_image.json"}
    return sorted(str(p) for p in files if p.parent not in finished or p.name.endswith(".tmp"))


@pytest.mark.parametrize("sig, code, moments", [(signal.SIGTERM, 143, [1.0, 2.5, "progress"]),
                                                (signal.SIGINT, 130, [1.5, "progress"])])
def test_a_signal_at_start_up_stops_the_batch(tmp_path, sig, code, moments):
    """Sent while Python imports torch and diffusers, while the model loads, or as the first edit starts: exit
    130/143, no traceback, nothing half-written (before: SIGINT before the handlers gave a traceback, and a signal
    landing in a finalizer let the batch run to the end with exit code 0)."""
    root = tmp_path / "db"
    for name in ("cat/a", "cat/b", "cat/c"):
        _sample(root / name)
    for k, when in enumerate(moments):
        out = tmp_path / f"out{k}"
        returncode, err = _signal_batch(root, out, sig, when)
        assert returncode == code, f"signal at {when}: exit {returncode}\n{err}"
        assert "Traceback" not in err, f"signal at {when}:\n{err}"
        assert ("terminated (SIGTERM)" if sig == signal.SIGTERM else "interrupted (Ctrl-C)") in err, err
        assert _unfinished(out) == [], f"signal at {when}"
        if when != "progress":
            assert not out.exists() or _files(out) == {}, f"signal at {when}"
