"""Face reshaping by landmarks (the official demo's fifth task, `mode='landmark'`).

The photo's face is aligned FFHQ-style to a 1024-px crop (the task's `Frame`), the edit runs on that crop, and the
result is put back into the photo at its full resolution. Every source landmark is dragged onto its target with
the drag energy: one 3x3 feature box per landmark at the target compared with the reference features at the
landmark, ÷ (2 layers · 68), no content term, no inpainting term (the official `w_inpaint` is accepted there but
unused), no user mask (the edit gradient acts everywhere), z_T unchanged. Regional SDE acts on the whole image (the
official passes the same strength inside and outside). Bank: concatenate, from step 5 on. c = 0.04.

Targets, as the official demo: the reference face's landmarks, detected again on its aligned crop; or given
directly (`target_landmarks`, e.g. an edited copy of the detected landmarks, in the photo's pixels). Handles: the
source landmarks detected again on the aligned crop (official), or the given/detected photo landmarks mapped onto
the crop when the targets are photo points (so unchanged points stay exactly in place). Landmarks outside the
chosen `groups` keep their place (target = handle).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .. import energies as E
from .. import face as F
from ..attention import CONCAT
from ..features import resize_features
from ..inputs import load_image, resize_image
from .base import Frame, Task, TaskInfo, TaskUI, UIField, common_fields
from .drag import box_cells
from .params import FACE, GROUPS, IMAGE, LANDMARKS, Params, param, weight

PROMPT = "a photo of a human face"


@dataclass
class FaceTask(Task):
    pairs: list = field(default_factory=list)  # [(target_box, handle_box)] feature cells per landmark
    w_edit: float = None

    def energies(self, gen, refs):
        f, r = resize_features(gen, self.grid.feature_hw), resize_features(refs[0], self.grid.feature_hw)
        return E.landmark_edit(f, r, self.pairs, self.w_edit), None


@dataclass(frozen=True)
class FaceParams(Params):
    """Parameters of a face reshaping."""

    TASK = "face"
    reference: Any = param(None, kind=IMAGE, doc="a photo of the face whose landmarks are the targets")
    target_landmarks: Any = param(None, kind=LANDMARKS,
                                  doc="68 target points in the image's pixels, instead of a reference (JSON/.npy/txt)")
    landmarks: Any = param(None, kind=LANDMARKS, default_text="detected",
                           doc="the face's 68 landmarks in the image's pixels (JSON/.npy/txt); skips detection")
    reference_landmarks: Any = param(None, kind=LANDMARKS, default_text="detected",
                                     doc="the reference face's 68 landmarks in its pixels; skips its detection")
    groups: tuple = param(tuple(F.GROUPS), kind=GROUPS, doc="landmark groups to reshape (the others stay): "
                          + ",".join(F.GROUPS))
    face: Any = param(None, kind=FACE, default_text="the only or clearly best one",
                      doc="which face of the image: an index into the detected faces or a box x0,y0,x1,y1")
    reference_face: Any = param(None, kind=FACE, default_text="the only or clearly best one",
                                doc="which face of the reference: an index or a box x0,y0,x1,y1")
    w_edit: float = weight(12.0, "weight of the landmark energy (target boxes like the landmark boxes)")


def _redetected(crop: np.ndarray, expected: np.ndarray) -> np.ndarray | None:
    """Landmarks detected again on an aligned crop (the official step): of the faces found, the one nearest to where
    the photo's landmarks map (the official takes the last); None when the crop shows none."""
    faces = F.detect(crop)
    if not faces:
        return None
    return min(faces, key=lambda f: F.landmark_error(f.landmarks, expected)).landmarks


def make_frame(spec, photo: np.ndarray) -> Frame:
    """Find the face (given landmarks, or detected and chosen), align it, and place the handles on the crop."""
    p = spec.params
    if p.landmarks is not None:
        points = F.check_landmarks(p.landmarks, "landmarks", photo.shape[:2])
    else:
        points = F.choose(F.detect(photo), p.face, "image").landmarks
    return _frame(p, photo, points)


def _frame(p, photo: np.ndarray, points: np.ndarray) -> Frame:
    crop, alignment = F.align(photo, points, name="image")
    mapped = alignment.to_aligned(points)
    flags = []
    if p.landmarks is None and p.target_landmarks is None:
        handles = _redetected(crop, mapped)
        if handles is None:
            flags.append("no face found again on the aligned crop; the photo's landmarks were mapped onto it")
            handles = mapped
    else:
        handles = mapped
    return Frame(image=crop, photo=photo, alignment=alignment,
                 data={"landmarks": points, "handles": handles, "flags": flags})


def _targets(p, frame: Frame) -> tuple[np.ndarray, np.ndarray | None]:
    """Target landmarks on the source's aligned crop (1024 px), and the aligned reference crop (or None)."""
    given_ref = p.reference is not None or p.reference_landmarks is not None
    if p.target_landmarks is not None:
        if given_ref:
            raise ValueError("target_landmarks: give the targets either as points or by a reference face, not both")
        targets = F.check_landmarks(p.target_landmarks, "target_landmarks", frame.photo.shape[:2])  # photo pixels
        return frame.alignment.to_aligned(targets), None
    if not given_ref:
        raise ValueError("reference: required (a reference face photo, or its reference_landmarks), unless "
                         "target_landmarks are given")
    if p.reference is None:  # landmarks only: where they land on their own aligned square
        points = F.check_landmarks(p.reference_landmarks, "reference_landmarks")
        return F.ideal_alignment(points).to_aligned(points), None
    ref = load_image(p.reference, "reference")
    if p.reference_landmarks is not None:
        points = F.check_landmarks(p.reference_landmarks, "reference_landmarks", ref.shape[:2])
    else:
        points = F.choose(F.detect(ref), p.reference_face, "reference", "reference_face").landmarks
    crop, alignment = F.align(ref, points, name="reference")
    mapped = alignment.to_aligned(points)
    targets = _redetected(crop, mapped) if p.reference_landmarks is None else None
    return (mapped if targets is None else targets), crop


def cell(x: float, y: float, scale: tuple[float, float], cell_px: int, feat_hw) -> tuple[int, int]:
    """Official: the point scaled to the working size and truncated, then its feature cell, kept one cell inside
    the border (each axis by its own bound)."""
    xs, ys = int(x * scale[0]), int(y * scale[1])
    return int(np.clip(ys // cell_px, 1, feat_hw[0] - 2)), int(np.clip(xs // cell_px, 1, feat_hw[1] - 2))


def from_spec(spec, prep) -> FaceTask:
    p = spec.params
    frame = prep.frame
    if frame is None:
        raise ValueError("image: the face task edits an aligned crop of a photo; pass the photo (not an Inversion)")
    handles = np.asarray(frame.data["handles"], dtype=np.float64)
    targets, ref_crop = _targets(p, frame)
    keep = np.setdiff1d(np.arange(F.N_LANDMARKS), F.group_indices(p.groups))
    targets = targets.copy()
    targets[keep] = handles[keep]
    grid = prep.grid
    feat_hw, cell_px = grid.feature_hw, grid.feature_cell
    scale = prep.input_scale
    pairs, boxes = [], np.zeros((2, F.N_LANDMARKS) + feat_hw, dtype=bool)
    for k, ((hx, hy), (tx, ty)) in enumerate(zip(handles, targets)):
        handle_box = box_cells(*cell(hx, hy, scale, cell_px, feat_hw))
        target_box = box_cells(*cell(tx, ty, scale, cell_px, feat_hw))
        pairs.append((target_box, handle_box))
        boxes[0, k][handle_box], boxes[1, k][target_box] = True, True
    latent_hw = grid.latent_hw
    everywhere = torch.ones(1, 1, *latent_hw)
    size = frame.image.shape[0]
    weight_ = F.face_weight(np.concatenate([handles, targets]), size)
    common = common_fields(spec, prep)
    reference_image = None if ref_crop is None else resize_image(ref_crop, prep.size_hw)
    return FaceTask(
        name="face",
        edit_region=everywhere,
        sde_region=everywhere,
        bank_mode=CONCAT,
        masks={"handle_boxes": boxes[0], "target_boxes": boxes[1]},
        paste_weight=weight_,
        landmarks={"handles": handles, "targets": targets, "photo": np.asarray(frame.data["landmarks"])},
        flags=list(frame.data["flags"]),
        pairs=pairs,
        w_edit=p.w_edit,
        **{**common, "reference_image": reference_image},
    )


# ------------------------------------------------------------------------------ edges: UI, preview


def _arrows(result) -> list:
    """From each landmark that moves to its target (at the working size)."""
    if result.landmarks is None:
        return []
    sx, sy = result.input_scale
    return [((hx * sx, hy * sy), (tx * sx, ty * sy))
            for (hx, hy), (tx, ty) in zip(result.landmarks["handles"], result.landmarks["targets"])
            if abs(hx - tx) + abs(hy - ty) >= 1]


def _preview(image: np.ndarray, reference: np.ndarray | None, fields: dict) -> dict:
    """The web UI's preview (TaskUI.preview): the handles and the targets as the task places them on the aligned
    crop, mapped back into the photo; the detected faces' boxes when the choice of face is missing or wrong, or
    when one of several was taken (said in the message area)."""
    out = {"handles": None, "targets": None, "boxes": [], "problem": None}
    try:
        p = FaceParams(reference=reference, **{k: v for k, v in fields.items() if v is not None})
        faces = F.detect(image)
        try:
            points = F.choose(faces, p.face, "image").landmarks
        except ValueError:
            out["boxes"] = [f.box for f in faces]
            raise
        taken = F.dominant(faces) if p.face is None and len(faces) > 1 else None
        if taken is not None:  # one of several taken: number their boxes and say which (the face field changes it)
            out["boxes"], out["problem"] = [f.box for f in faces], F.taken_note(faces, taken, "image")
        frame = _frame(p, image, points)
        handles = np.asarray(frame.data["handles"], dtype=np.float64)
        out["handles"] = frame.alignment.to_photo(handles)
        if reference is not None:
            targets = _targets(p, frame)[0].copy()
            keep = np.setdiff1d(np.arange(F.N_LANDMARKS), F.group_indices(p.groups))
            targets[keep] = handles[keep]
            out["targets"] = frame.alignment.to_photo(targets)
    except (ValueError, TypeError, ImportError) as e:
        out["problem"] = str(e)
    return out


UI = TaskUI(
    title="Face",
    mask_on_image=False,
    examples=False,
    reference_upload="Reference face: its landmarks are the targets",
    fields=(UIField("groups", "Landmark groups to reshape", tuple(F.GROUPS)),
            UIField("face", "Face in the image (index or x0,y0,x1,y1; empty: the only or clearly best one)"),
            UIField("reference_face",
                    "Face in the reference (index or x0,y0,x1,y1; empty: the only or clearly best one)")),
    preview=_preview,
    working_result="Edited aligned crop (working size)",
    api_fields={"landmarks": "json", "target_landmarks": "json", "reference_landmarks": "json"},
)

INFO = TaskInfo(
    name="face",
    build=from_spec,
    params=FaceParams,
    settings={"guidance_scale": 4.0, "energy_scale": 3.0, "gradient_coef": 0.04, "bank_steps": (5, None),
              "ip_scale": 0.05, "sde_strength": 0.2, "prompt": PROMPT},
    doc="Reshape a face toward a reference face (or given target landmarks) by dragging its 68 landmarks",
    example="portrait.png --reference other.png --face 0",
    images=1,
    arrows=_arrows,
    ui=UI,
    frame=make_frame,
)
