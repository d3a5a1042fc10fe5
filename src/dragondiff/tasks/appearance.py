"""Appearance replacing: give the object the look of an object in a reference image.

Base and reference are inverted together; sampling starts from the base z_T unchanged. The edit energy compares
mean feature vectors (global appearance); the content energy keeps everything outside the object.
Bank: masked union (base background + reference object), steps 0..35. c = 0.04.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .. import energies as E
from ..attention import UNION
from ..features import resize_features
from .base import BenchCase, Task, TaskInfo, TaskUI, common_fields, latent_region, nearest
from .params import IMAGE, MASK, TEXT, Params, param, weight


@dataclass
class AppearanceTask(Task):
    inside: torch.Tensor = None  # base object, feature res
    ref_inside: torch.Tensor = None  # reference object, feature res
    w_edit: float = None
    w_content: float = None

    def energies(self, gen, refs):
        hw = self.grid.feature_hw
        f = resize_features(gen, hw)
        base, ref = resize_features(refs[0], hw), resize_features(refs[1], hw)
        return (
            E.appearance_edit(f, ref, self.inside, self.ref_inside, self.w_edit),
            E.keep_background(f, base, ~self.inside, self.w_content),
        )


def build_appearance(*, mask, reference_mask, **common) -> AppearanceTask:
    """mask, reference_mask: image-res bool tensors, both at the base image's working size."""
    grid = common["grid"]
    feat_hw, latent_hw = grid.feature_hw, grid.latent_hw
    inside, ref_inside = nearest(mask, feat_hw), nearest(reference_mask, feat_hw)
    for name, m in (("mask", inside), ("reference_mask", ref_inside)):
        if not m.any():
            raise ValueError(f"{name}: the object is smaller than one feature cell ({grid.feature_cell} px) at the "
                             "working size")
    if inside.all():
        raise ValueError("mask: the object covers the whole image; leave some background")
    region = latent_region(inside, latent_hw)
    return AppearanceTask(
        name="appearance",
        edit_region=region,
        sde_region=region,
        bank_mode=UNION,
        union_masks={"base": mask, "replace": reference_mask},
        masks={"object": mask.numpy(), "reference_object": reference_mask.numpy()},
        inside=inside,
        ref_inside=ref_inside,
        **common,
    )


@dataclass(frozen=True)
class AppearanceParams(Params):
    """Parameters of an appearance replacement."""

    TASK = "appearance"
    mask: Any = param(kind=MASK, of="image", doc="the object to restyle")
    reference: Any = param(kind=IMAGE, doc="the image whose object lends its appearance")
    reference_mask: Any = param(kind=MASK, of="reference", doc="that object, the size of the reference")
    reference_prompt: str = param(None, kind=TEXT, default_from="prompt", default_text="the prompt",
                                  doc="the reference image's inversion prompt")
    w_edit: float = weight(3.5, "weight of the edit energy (object's mean features like the reference's)")
    w_content: float = weight(5.0, "weight of the content energy (outside the object kept)")


def from_spec(spec, prep) -> AppearanceTask:
    p = spec.params
    obj = prep.mask(p.mask, "mask")
    ref_pixels, ref_image, ref_mask = prep.reference(p.reference, p.reference_mask)
    return build_appearance(mask=obj, reference_mask=ref_mask, w_edit=p.w_edit, w_content=p.w_content,
                            **common_fields(spec, prep, reference=(ref_pixels, ref_image)))


# ------------------------------------------------------------------------------ edges: UI, preview, benchmarks
# (the benchmark's scene generator and metrics are imported when a case is made or scored)


def _make_appearance(seed, rng, scene) -> dict | None:
    """The first object recoloured to a colour not in the scene, given by a one-shape reference scene."""
    from ..shapes.scenes import COLOURS, Shape, make_scene

    obj, others = scene.shapes[0], scene.shapes[1:]
    used = {obj.colour, scene.background[0]} | {o.colour for o in others}
    if scene.background[1]:
        used.add(scene.background[1])
    free = [c for c in COLOURS if c not in used]
    if not free:
        return None
    colour = str(rng.choice(free))
    ref_shape = Shape(str(rng.choice(["circle", "square", "triangle"])), colour, 64.0, 64.0, 22.0)
    bg_ref = next(c for c in COLOURS if c != colour)
    reference = make_scene([ref_shape], (bg_ref, None, 0.0))
    target = make_scene([Shape(obj.kind, colour, obj.cx, obj.cy, obj.r)] + others, scene.background)
    # The prompt names the object without its old colour: a user asking for a new look would not write the old
    # one, and with it CFG pulls the object back to that colour (measured: docs/shapes-model.md).
    prompt = scene.caption.replace(f"a {obj.colour} {obj.kind}", f"a {obj.kind}", 1)
    fields = {"mask": scene.masks[0], "reference": reference.image, "reference_mask": reference.masks[0],
              "reference_prompt": reference.caption}
    return {"target": target, "index": 0, "kwargs": fields, "reference": reference, "prompt": prompt}


def _evaluate_appearance(case, output, colours, background, roundtrip):
    """The object's median colour against the reference object's, and the reference colour's shape."""
    from ..shapes.metrics import THRESHOLDS, delta_e, dilate, iou, measured_colour, segment

    obj = case.scene.masks[case.index]
    ref_recon = roundtrip([case.reference])[0]
    ref_colour = measured_colour(ref_recon, case.reference.masks[0])
    others = [c for k, c in enumerate(colours) if k != case.index] + [colours[case.index]]
    m = {"delta_e": delta_e(measured_colour(output, obj), ref_colour),
         "shape_iou": iou(segment(output, ref_colour, others, background), obj)}
    return m, ~dilate(obj, 4), m["delta_e"] <= THRESHOLDS["delta_e"] and m["shape_iou"] >= THRESHOLDS["shape_iou"]


UI = TaskUI(
    title="Appearance",
    # ask for the new look without naming the old colour (the example scenes' object is red)
    example_prompt=lambda caption: caption.replace("a red ", "a ", 1),
)

INFO = TaskInfo(
    name="appearance",
    build=from_spec,
    params=AppearanceParams,
    settings={"guidance_scale": 5.0, "energy_scale": 2.0, "gradient_coef": 0.04,
              "bank_steps": (0, 35), "ip_scale": 0.1},
    doc="Give the masked object the appearance of the object masked in a reference image",
    example="apple.png --mask apple_mask.png --reference pear.png --reference-mask pear_mask.png",
    images=2,
    user_mask="object",
    ui=UI,
    bench={"appearance": BenchCase(
        seed_offset=3_000_000, make=_make_appearance, evaluate=_evaluate_appearance,
        example=lambda sc: {"mask": sc.object, "reference": sc.image, "reference_mask": sc.other})},
)
