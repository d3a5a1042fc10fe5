"""Face reshaping: landmarks, the official alignment and its inverse, the task end to end, its errors.

The photo is scikit-image's `astronaut` (NASA, public domain), shipped in tests/data/face as a JPEG, with the 68
landmarks dlib found on it (so that most tests need no detector). Tests that detect need the `face` extra.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import FAST, require
from test_reliability import main  # noqa: F401 (fixture: the CLI in this process)
from dragondiff import face as F
from dragondiff.errors import InputNote
from dragondiff.spec import EditSpec

DATA = Path(__file__).parent / "data" / "face"
PHOTO = np.asarray(Image.open(DATA / "astronaut.jpg").convert("RGB"))
LANDMARKS = np.array(json.loads((DATA / "astronaut-landmarks.json").read_text())["landmarks"], dtype=float)
# Read off the photo by eye (not from any detector): the eyes and the chin of the astronaut.
LEFT_EYE, RIGHT_EYE = (190, 94, 216, 110), (232, 95, 260, 112)  # x0, y0, x1, y1
CHIN = (225, 174)


def needs_dlib():
    require("face landmarks", modules=("dlib", "face_recognition_models"))


def inside(points, box):
    x0, y0, x1, y1 = box
    return np.all((points[:, 0] >= x0) & (points[:, 0] <= x1) & (points[:, 1] >= y0) & (points[:, 1] <= y1))


def warped(image, shear=0.08, dx=-10):
    """A second face: the same photo sheared (as a reference or a second photo)."""
    return np.asarray(Image.fromarray(image).transform(image.shape[1::-1], Image.AFFINE, (1, shear, dx, 0, 1, 0),
                                                        Image.BILINEAR))


# ------------------------------------------------------------------------------------------------ landmarks


def check_on_features(points):
    assert inside(points[36:42], LEFT_EYE) and inside(points[42:48], RIGHT_EYE)
    jaw = points[0:17]
    assert np.hypot(*(jaw[8] - CHIN)) < 8  # the chin
    assert np.all(np.diff(jaw[:, 0]) >= 0) and jaw[16, 0] - jaw[0, 0] > 80  # left to right, face-wide...
    assert np.all(np.diff(jaw[:9, 1]) > 0) and np.all(np.diff(jaw[8:, 1]) < 0)  # ...down to the chin and up again
    assert jaw[4:13, 1].min() > points[36:48, 1].max()  # its lower part lies below the eyes
    assert points[48:68, 1].min() > points[27:36, 1].min() and points[8, 1] > points[48:68, 1].max()  # mouth


def test_the_stored_landmarks_lie_on_the_features():
    check_on_features(LANDMARKS)


def test_detected_landmarks_lie_on_the_features_and_several_faces_are_listed():
    needs_dlib()
    faces = F.detect(PHOTO)
    # dlib's HOG detector also fires (weakly) on the flag: the official code would silently take that last one.
    assert len(faces) == 2 and faces[0].score > faces[1].score
    check_on_features(faces[0].landmarks)
    assert F.landmark_error(faces[0].landmarks, LANDMARKS) < 1.0
    # the face clearly dominates the weak hit on the flag: taken, with a note naming the other and how to choose
    with pytest.warns(InputNote, match=r"^image: 2 faces found; took #0 \(box \(175, 76, 265, 166\), score 1\.21\), "
                      r"which clearly dominates the others \(#1: box \(126, 335, 215, 425\), score 0\.16\); to take "
                      r"another, pass face= \(--face\) as an index or a box"):
        assert F.choose(faces, None, "image") is faces[0]
    assert F.choose(faces, (170, 70, 270, 170), "image") is faces[0] and F.choose(faces, 1, "image") is faces[1]
    with pytest.raises(ValueError, match="face index 2 out of range"):
        F.choose(faces, 2, "image")
    with pytest.raises(ValueError, match=r"^reference: no face found"):
        F.choose(F.detect(np.full((200, 200, 3), 128, np.uint8)), None, "reference")


def test_landmarks_are_read_from_arrays_and_files(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(LANDMARKS.tolist()))
    (tmp_path / "b.json").write_text(json.dumps({"landmarks": LANDMARKS.tolist()}))
    np.save(tmp_path / "c.npy", LANDMARKS)
    (tmp_path / "d.txt").write_text("\n".join(f"{x} {y}" for x, y in LANDMARKS))
    for name in ("a.json", "b.json", "c.npy", "d.txt"):
        assert np.array_equal(F.check_landmarks(tmp_path / name, "landmarks"), LANDMARKS)
    with pytest.raises(ValueError, match=r"^landmarks: expected 68 \(x, y\) points .* got shape \(5, 2\)"):
        F.check_landmarks(LANDMARKS[:5], "landmarks")
    with pytest.raises(FileNotFoundError, match="^target_landmarks: file not found"):
        F.check_landmarks(tmp_path / "none.json", "target_landmarks")
    with pytest.raises(ValueError, match="^landmarks: expected 68"):
        EditSpec(task="face", image="x.png", landmarks=LANDMARKS[:5])
    with pytest.raises(ValueError, match="^groups: unknown landmark group 'ears'"):
        EditSpec(task="face", image="x.png", groups="mouth,ears")
    assert EditSpec(task="face", image="x.png", groups="mouth, jaw").groups == ("jaw", "mouth")
    assert EditSpec(task="face", image="x.png", face="1").face == 1
    assert EditSpec(task="face", image="x.png", face="1,2,30,40").face == (1.0, 2.0, 30.0, 40.0)
    with pytest.raises(ValueError, match="^face: a box is x0,y0,x1,y1 with x0 < x1"):
        EditSpec(task="face", image="x.png", face=(5, 5, 1, 9))


# ------------------------------------------------------------------------------------------------ alignment


def test_alignment_follows_the_official_square_and_round_trips():
    crop, alignment = F.align(PHOTO, LANDMARKS)
    assert crop.shape == (1024, 1024, 3) and crop.dtype == np.uint8
    # points: exact both ways
    assert F.landmark_error(alignment.to_photo(alignment.to_aligned(LANDMARKS)), LANDMARKS) < 1e-9
    # the official square: eyes level and centred, at fixed places of the crop
    eyes = alignment.to_aligned(np.stack([LANDMARKS[36:42].mean(0), LANDMARKS[42:48].mean(0)]))
    assert abs(eyes[0, 1] - eyes[1, 1]) < 2 and abs(eyes.mean(0)[0] - 511.5) < 30
    # pixels: the crop samples the photo where the matrix says (a smooth patch of the cheek, a few px)
    for a in ([430.0, 600.0], [600.0, 600.0], [512.0, 300.0]):
        p = alignment.to_photo(np.array(a))
        assert np.abs(crop[int(a[1]), int(a[0])].astype(int) - PHOTO[int(round(p[1])), int(round(p[0]))]).max() < 12
    # and back: the unedited crop put back into the photo reproduces it (blur of the 1024 -> 173 px resampling)
    back = F.paste_back(PHOTO, crop, alignment, np.ones((1024, 1024), np.float32))
    face = (slice(100, 170), slice(190, 260))
    assert np.abs(back[face].astype(int) - PHOTO[face]).mean() < 4
    (x0, y0), (x1, y1) = np.floor(alignment.quad.min(0)).astype(int) - 2, np.ceil(alignment.quad.max(0)).astype(int) + 2
    outside = np.ones(PHOTO.shape[:2], bool)
    outside[max(0, y0):y1, max(0, x0):x1] = False
    assert outside.mean() > 0.7
    assert np.array_equal(back[outside], PHOTO[outside])  # beyond the crop: the photo's pixels, bit for bit


def test_alignment_of_a_large_photo_shrinks_and_still_round_trips():
    big = np.asarray(Image.fromarray(PHOTO).resize((1536, 1536), Image.LANCZOS))  # a 519-px face: shrink 2x first
    lm = LANDMARKS * 3 + 1
    crop, alignment = F.align(big, lm)
    small, small_al = F.align(PHOTO, LANDMARKS)
    assert F.landmark_error(alignment.to_aligned(lm), small_al.to_aligned(LANDMARKS)) < 1.5
    assert np.abs(crop.astype(int) - small).mean() < 12


def test_a_face_too_small_is_refused():
    with pytest.raises(ValueError, match=r"^image: the face is too small: its aligned square is 43 px wide"):
        F.align(PHOTO, LANDMARKS / 4)


def test_landmarks_found_again_on_the_aligned_crop_map_back_within_a_pixel():
    needs_dlib()
    crop, alignment = F.align(PHOTO, LANDMARKS)
    again = F.detect(crop)
    assert len(again) == 1
    assert F.landmark_error(alignment.to_photo(again[0].landmarks), LANDMARKS) < 1.0


# ------------------------------------------------------------------------------------------------ the task


def mouth_lowered(points, dy=8.0):
    out = np.array(points, dtype=float)
    out[48:68, 1] += dy
    return out


def test_face_task_end_to_end_with_given_landmarks(tiny_pipe):
    """No detector needed: landmarks and targets given. The photo comes back at full size, unchanged away from
    the face; the landmarks outside the chosen groups stay."""
    out = tiny_pipe.reshape_face(PHOTO, landmarks=LANDMARKS, target_landmarks=mouth_lowered(LANDMARKS),
                                 groups=("mouth", "jaw"), **FAST)
    spec = out.spec
    assert (spec.prompt, spec.energy_scale, spec.guidance_scale, spec.sde_strength, spec.ip_scale,
            spec.gradient_coef, spec.params.w_edit) == ("a photo of a human face", 3.0, 4.0, 0.2, 0.05, 0.04, 12.0)
    assert out.image.size == (128, 128) and out.photo.size == (512, 512)
    photo = np.asarray(out.photo)
    far = np.ones(PHOTO.shape[:2], bool)
    far[40:240, 120:330] = False
    assert np.array_equal(photo[far], PHOTO[far]) and not np.array_equal(photo, PHOTO)
    handles, targets = out.landmarks["handles"], out.landmarks["targets"]
    moved = np.hypot(*(targets - handles).T) > 1e-6
    assert moved[48:68].all() and not moved[:48].any()  # jaw chosen but not moved by the targets
    assert out.masks["handle_boxes"].shape == (68, 32, 32) and all(np.isfinite(e[2]) for e in out.energies)
    # the same edit as a spec, JSON round trip
    again = EditSpec.from_json(spec.to_json().replace('"<in-memory array 512x512x3 uint8>"', '"x.png"'))
    assert again.target_landmarks == spec.target_landmarks and again.groups == ("jaw", "mouth")


def test_face_task_follows_a_reference_face(tiny_pipe):
    needs_dlib()
    reference = warped(PHOTO)
    out = tiny_pipe.reshape_face(PHOTO, reference=reference, face=0, reference_face=(160, 60, 290, 190), **FAST)
    handles, targets = out.landmarks["handles"], out.landmarks["targets"]
    assert 3 < np.abs(targets - handles).max() < 60  # the sheared face's landmarks differ, modestly
    assert out.reference_image is not None and out.photo.size == (512, 512)
    assert out.flags == []


def test_face_errors_come_before_any_model_work():
    from dragondiff.planning import plan_edit

    def plan(**fields):
        return plan_edit(EditSpec(task="face", image=PHOTO, **fields), factors=(8, 2))

    with pytest.raises(ValueError, match="^reference: required"):
        plan(landmarks=LANDMARKS)
    with pytest.raises(ValueError, match="^target_landmarks: give the targets either"):
        plan(landmarks=LANDMARKS, target_landmarks=LANDMARKS, reference_landmarks=LANDMARKS)
    with pytest.raises(ValueError, match="^image: the face is too small"):
        plan(landmarks=LANDMARKS / 4, target_landmarks=LANDMARKS / 4)
    spec, prep, task = plan(landmarks=LANDMARKS, reference_landmarks=warped_points(LANDMARKS))
    assert prep.size_hw == (768, 768) and prep.input_scale == (0.75, 0.75) and len(task.pairs) == 68


def warped_points(points, shear=0.08, dx=-10):
    """Where `warped` moves points: x' = x - shear·y - dx."""
    out = np.array(points, dtype=float)
    out[:, 0] = points[:, 0] - shear * points[:, 1] - dx
    return out


def test_face_detection_errors():
    needs_dlib()
    from dragondiff.planning import plan_edit

    def plan(image, **fields):
        return plan_edit(EditSpec(task="face", image=image, **fields), factors=(8, 2))

    two = np.ascontiguousarray(np.concatenate([PHOTO, PHOTO[:, ::-1]], axis=1))  # two faces scoring alike
    with pytest.raises(ValueError, match=r"^image: 4 faces found .* and none clearly dominates .*; choose one by "
                                         r"face= \(--face\) as an index or a box"):
        plan(two, target_landmarks=LANDMARKS)
    with pytest.raises(ValueError, match=r"^image: no face found"):
        plan(np.full((256, 256, 3), 90, np.uint8), target_landmarks=LANDMARKS)
    with pytest.raises(ValueError, match=r"^reference: 4 faces found .*none clearly dominates.* reference_face= "
                                         r"\(--reference-face\)"):
        plan(warped(PHOTO), reference=two)
    small = np.asarray(Image.fromarray(PHOTO).resize((320, 320), Image.LANCZOS))
    with pytest.raises(ValueError, match=r"^image: the face is too small"):
        plan(small, face=0, target_landmarks=LANDMARKS)


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_face_with_landmark_files(tmp_path):
    """`dragondiff face PHOTO --landmarks FILE --target-landmarks FILE` writes the photo at full size and a
    sidecar; a missing target is refused before the model loads."""
    from test_cli import FAST as CLI_FAST, cli

    (tmp_path / "lm.json").write_text(json.dumps(LANDMARKS.tolist()))
    (tmp_path / "targets.json").write_text(json.dumps(mouth_lowered(LANDMARKS).tolist()))
    out = cli("face", DATA / "astronaut.jpg", "--landmarks", tmp_path / "lm.json", "--target-landmarks",
              tmp_path / "targets.json", "--groups", "mouth", "-o", tmp_path / "out.png", *CLI_FAST)
    assert out.returncode == 0, out.stderr
    assert Image.open(tmp_path / "out.png").size == (512, 512)
    side = json.loads((tmp_path / "out.json").read_text())
    assert side["spec"]["task"] == "face" and side["spec"]["groups"] == ["mouth"]
    bad = cli("face", DATA / "astronaut.jpg", "--landmarks", tmp_path / "lm.json", "-o", tmp_path / "x.png",
              *CLI_FAST)
    assert bad.returncode != 0 and "reference: required" in bad.stderr and not (tmp_path / "x.png").exists()


# ------------------------------------------------------------------------------------------------ choice of face


def fake(box, score) -> F.Face:
    return F.Face(box, score, LANDMARKS)


@pytest.mark.parametrize("faces, chosen", [
    ([fake((175, 76, 265, 166), 1.21), fake((126, 335, 215, 425), 0.16)], 0),  # the astronaut and the flag
    ([fake((0, 0, 40, 40), 0.3), fake((100, 100, 190, 190), 1.5)], 1),  # any order; the other smaller and weaker
    ([fake((0, 0, 90, 90), 1.0), fake((100, 100, 190, 190), 0.5)], 0),  # exactly 2x
    ([fake((0, 0, 90, 90), 1.0), fake((100, 100, 208, 208), 0.2)], 0),  # one pyramid step larger: 1.44x the area
    ([fake((0, 0, 90, 90), 1.2), fake((100, 100, 190, 190), 1.0)], None),  # two faces scoring alike
    ([fake((0, 0, 90, 90), 1.0), fake((100, 100, 190, 190), 0.6)], None),  # under 2x
    ([fake((0, 0, 60, 60), 1.5), fake((100, 100, 260, 260), 0.5)], None),  # the best is a much smaller face
    ([fake((0, 0, 90, 90), 1.5), fake((100, 100, 190, 190), 0.2), fake((300, 0, 390, 90), 0.9)], None),
    ([fake((0, 0, 90, 90), 0.0), fake((100, 100, 190, 190), 0.0)], None),  # no score to go by
])
def test_a_face_is_taken_only_when_it_clearly_dominates(faces, chosen):
    """The rule (face.DOMINANT_SCORE, DOMINANT_AREA): a score at least 2x and a box at least 2/3 of every other
    detection's; otherwise the faces are listed and one must be chosen."""
    assert F.dominant(faces) == chosen
    if chosen is None:
        with pytest.raises(ValueError, match=rf"^image: {len(faces)} faces found \(#0: box .* none clearly dominates"):
            F.choose(faces, None, "image")
    else:
        with pytest.warns(InputNote, match=rf"took #{chosen} "):
            assert F.choose(faces, None, "image") is faces[chosen]
    assert F.choose(faces, 1, "image") is faces[1]  # an explicit choice always wins


def test_cli_takes_the_dominant_face_with_a_note(tmp_path, main):
    """`dragondiff face astronaut.jpg` (the face and a weak hit on the flag) goes on with the face and a note."""
    needs_dlib()
    from conftest import TINY_MODEL

    (tmp_path / "targets.json").write_text(json.dumps(mouth_lowered(LANDMARKS).tolist()))
    code, out, err = main("face", DATA / "astronaut.jpg", "--target-landmarks", tmp_path / "targets.json", "-o",
                          tmp_path / "out.png", "--model", TINY_MODEL, "--threads", "1", "--dry-run")
    assert code == 0, err
    assert "note: image: 2 faces found; took #0 (box (175, 76, 265, 166), score 1.21)" in err
    assert "#1: box (126, 335, 215, 425), score 0.16" in err and "--face" in err and "valid" in out


def test_ui_preview_numbers_the_faces_and_says_which_was_taken():
    needs_dlib()
    from dragondiff.tasks.face import _preview

    out = _preview(PHOTO, None, {})
    assert len(out["boxes"]) == 2 and out["handles"] is not None
    assert out["problem"].startswith("image: 2 faces found; took #0")
    assert "#1: box (126, 335, 215, 425)" in out["problem"]
    chosen = _preview(PHOTO, None, {"face": 0})
    assert chosen["boxes"] == [] and chosen["problem"] is None and chosen["handles"] is not None
