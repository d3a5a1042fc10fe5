"""Appearance replacing: give the object the look of an object in a reference image.

Base and reference are inverted together; sampling starts from the base z_T unchanged. The edit energy compares
mean feature vectors (global appearance); the content energy keeps everything outside the object.
Bank: masked union (base background + reference object), steps 0..35. c = 0.04.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import energies as E
from ..attention import UNION
from ..features import resize_features
from .base import Task, TaskInfo, common_fields, latent_region, nearest


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


def from_spec(spec, prep) -> AppearanceTask:
    obj = prep.mask(spec.mask, "mask")
    ref_pixels, ref_image, ref_mask = prep.reference(spec.reference, spec.reference_mask)
    return build_appearance(mask=obj, reference_mask=ref_mask, w_edit=spec.w_edit, w_content=spec.w_content,
                            **common_fields(spec, prep, reference=(ref_pixels, ref_image)))


INFO = TaskInfo(
    name="appearance",
    build=from_spec,
    fields=("mask", "reference", "reference_mask", "reference_prompt", "w_edit", "w_content"),
    required=("mask", "reference", "reference_mask"),
    defaults={"w_edit": 3.5, "w_content": 5.0, "gradient_coef": 0.04, "bank_steps": (0, 35)},
    settings={"guidance_scale": 5.0, "energy_scale": 2.0},
    doc="give the masked object the appearance of the masked object in a reference image",
)
