"""Hostile landmark files (issue 28, probe 4 finding 15): read only when what they declare fits (.npy headers, JSON
size and nesting), and refused when they cannot be a face of the photo (degenerate, non-finite, far outside), by
name, exit code 2, before any model work. Each row of the probe's table is a case here."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from conftest import TINY_MODEL
from dragondiff import face as F
from test_face import DATA, LANDMARKS, PHOTO, mouth_lowered
from test_reliability import main  # noqa: F401 (fixture: the CLI in this process)

CENTRE = LANDMARKS.mean(0)


def scaled(k: float) -> np.ndarray:
    return (LANDMARKS - CENTRE) * k + CENTRE


def write(folder, name: str, value) -> str:
    """A landmark file: JSON text, a .npy array, or a .npy header alone (declaring a shape its data lacks)."""
    path = folder / name
    if isinstance(value, str):
        path.write_text(value)
    elif isinstance(value, dict):  # a .npy header with a little data after it
        with open(path, "wb") as f:
            np.lib.format.write_array_header_1_0(f, value)
            f.write(b"\0" * 1000)
    elif name.endswith(".npy"):
        np.save(path, value)
    else:
        path.write_text(json.dumps(np.asarray(value).tolist()))
    return str(path)


DEEP = "[" * 200_000 + "]" * 200_000
HUGE_HEADER = {"descr": "<f8", "fortran_order": False, "shape": (2**31, 2)}  # 1,128 bytes declaring 32 GiB

# (option given the bad file, file name, content, what the refusal says): probe 4 §15's table, row by row.
CASES = [
    ("landmarks", "deep.json", DEEP, r"JSON nested 200,000 deep"),
    ("target_landmarks", "deep.json", DEEP, r"JSON nested 200,000 deep"),
    ("landmarks", "huge.npy", HUGE_HEADER, r"holds a 2147483648 x 2 array of float64"),
    ("landmarks", "equal.json", np.full((68, 2), 200.0), r"degenerate"),
    ("landmarks", "zero.json", np.zeros((68, 2)), r"degenerate"),
    ("reference_landmarks", "equal.json", np.full((68, 2), 200.0), r"degenerate"),
    ("reference_landmarks", "zero.json", np.zeros((68, 2)), r"degenerate"),
    ("landmarks", "right.json", LANDMARKS + 20_000, r"more than half the photo's size outside its 512x512"),
    ("landmarks", "left.json", LANDMARKS - 20_000, r"more than half the photo's size outside"),
    ("landmarks", "e300.json", LANDMARKS * 1e300, r"coordinates up to 2\.\d+e\+302 px"),
    ("landmarks", "x100.json", scaled(100), r"more than half the photo's size outside"),
    ("landmarks", "x1000.json", scaled(1000), r"more than half the photo's size outside"),
    ("landmarks", "x10000.json", scaled(10_000), r"coordinates up to|more than half the photo's size outside"),
    ("target_landmarks", "e300.json", LANDMARKS * 1e300, r"coordinates up to"),
    ("target_landmarks", "zero.json", np.zeros((68, 2)), r"degenerate"),
    ("target_landmarks", "right.json", LANDMARKS + 20_000, r"more than half the photo's size outside"),
    ("landmarks", "complex.npy", LANDMARKS.astype(np.complex128), r"array of complex128"),
]
OPTION = {"landmarks": "--landmarks", "target_landmarks": "--target-landmarks",
          "reference_landmarks": "--reference-landmarks"}


@pytest.mark.parametrize("field, name, content, says", CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_probe_landmark_files_are_refused_by_name_before_any_model_work(tmp_path, main, field, name, content, says):
    good = write(tmp_path, "good.json", LANDMARKS)
    files = {"landmarks": good, "target_landmarks": write(tmp_path, "targets.json", mouth_lowered(LANDMARKS))}
    if field == "reference_landmarks":
        del files["target_landmarks"]
    files[field] = write(tmp_path, name, content)
    args = [a for f, path in files.items() for a in (OPTION[f], path)]
    code, _, err = main("face", DATA / "astronaut.jpg", *args, "-o", tmp_path / "out.png", "--model", TINY_MODEL,
                        "--threads", "1", "--dry-run")
    assert code == 2, err
    assert f"{field}: " in err and re.search(says, err), err
    assert "Traceback" not in err and "Error:" in err and not (tmp_path / "out.png").exists()


def test_npy_headers_are_read_before_the_data(tmp_path):
    """The header decides: shape, dtype and ndim are checked before numpy allocates anything."""
    for header, says in [({"descr": "<f8", "fortran_order": False, "shape": (2**30, 2)}, "1073741824 x 2"),
                         ({"descr": "<f8", "fortran_order": False, "shape": (68, 3)}, "68 x 3 array"),
                         ({"descr": "|O", "fortran_order": False, "shape": (68, 2)}, "68 x 2 array of object"),
                         ({"descr": "<U8", "fortran_order": False, "shape": (68, 2)}, "68 x 2 array of <U8"),
                         ({"descr": "<f8", "fortran_order": False, "shape": ()}, "scalar array of float64")]:
        with pytest.raises(ValueError, match=f"^landmarks: cannot read .* \\(it holds a {says}"):
            F.check_landmarks(write(tmp_path, "h.npy", header), "landmarks")
    assert np.array_equal(F.check_landmarks(write(tmp_path, "ok.npy", LANDMARKS), "landmarks"), LANDMARKS)
    assert np.array_equal(F.check_landmarks(write(tmp_path, "i.npy", LANDMARKS.astype(np.int32)), "x"),
                          LANDMARKS.astype(np.int32))


def test_json_depth_is_counted_outside_strings(tmp_path):
    nested = json.dumps({"landmarks": LANDMARKS.tolist(), "note": "[[[[[[[[[[[[ not nesting"})
    assert np.array_equal(F.check_landmarks(write(tmp_path, "n.json", nested), "landmarks"), LANDMARKS)
    with pytest.raises(ValueError, match=r"^target_landmarks: cannot read .*JSON nested 9 deep"):
        F.check_landmarks(write(tmp_path, "d.json", "[" * 9 + "]" * 9), "target_landmarks")


def test_landmark_arrays_are_checked_like_files():
    """The library takes arrays too: the same refusals, named by the parameter."""
    with pytest.raises(TypeError, match=r"^landmarks: expected 68 real \(x, y\) points, got an array of complex128"):
        F.check_landmarks(LANDMARKS.astype(complex), "landmarks")
    with pytest.raises(ValueError, match=r"^reference_landmarks: the 68 points are degenerate"):
        F.check_landmarks(np.tile([[5.0, 5.0]], (68, 1)), "reference_landmarks")
    line = np.stack([np.arange(68.0), np.arange(68.0)], 1)  # one line: no area
    with pytest.raises(ValueError, match=r"^landmarks: the 68 points are degenerate"):
        F.check_landmarks(line, "landmarks")
    with pytest.raises(ValueError, match=r"^landmarks: the points span x .*outside its 512x512 pixels"):
        F.check_landmarks(LANDMARKS + [600, 0], "landmarks", (512, 512))  # x beyond 768
    # half the photo's size beyond the border is still allowed (a face cut by the frame), and without a photo
    # only the shape of the points is checked
    assert F.check_landmarks(LANDMARKS + [250, 0], "landmarks", (512, 512)).shape == (68, 2)
    assert F.check_landmarks(LANDMARKS + 20_000, "reference_landmarks").shape == (68, 2)


def test_library_refuses_before_model_work():
    from dragondiff.planning import plan_edit
    from dragondiff.spec import EditSpec

    def plan(**fields):
        return plan_edit(EditSpec(task="face", image=PHOTO, **fields), factors=(8, 2))

    with pytest.raises(ValueError, match=r"^target_landmarks: the points span"):
        plan(landmarks=LANDMARKS, target_landmarks=LANDMARKS + 20_000)
    with pytest.raises(ValueError, match=r"^landmarks: the 68 points are degenerate"):
        plan(landmarks=np.zeros((68, 2)), target_landmarks=LANDMARKS)
    with pytest.raises(ValueError, match=r"^reference_landmarks: the points span"):
        plan(landmarks=LANDMARKS, reference=PHOTO, reference_landmarks=LANDMARKS + 20_000)
