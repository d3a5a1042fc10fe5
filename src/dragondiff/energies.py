"""Energy terms of DragonDiffusion, as pure functions of feature maps (each follows the official code term by term;
docs/fidelity.md lists where and why).

Conventions: feature maps are (1, C, Hf, Wf) fp32 on the H/4 grid; `cells` are (ys, xs) index tensors or a
bool (Hf, Wf) mask; selecting gives (N, C) in the given (raster) order. Every energy has the form
w / (1 + 4·sim) (α = 1, β = 4). Where the official code averages over an empty selection (NaN energy with an
empty, hence zero, gradient) we return None so the caller can skip the term: same gradient, no NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BETA = 4.0
COS_EPS = 1e-8  # torch.nn.CosineSimilarity default, as in the official code


def select(feature: torch.Tensor, cells) -> torch.Tensor:
    """(1, C, H, W) -> (N, C) at the given cells: a bool (H, W) mask (raster order) or a (ys, xs) pair."""
    if isinstance(cells, torch.Tensor):
        return feature[0].permute(1, 2, 0)[cells]
    ys, xs = cells
    return feature[0][:, ys, xs].T


def cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity over the channel (last) dimension, raw in [-1, 1]."""
    return F.cosine_similarity(a, b, dim=-1, eps=COS_EPS)


def cos01(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(cos + 1) / 2, in [0, 1]."""
    return (cos(a, b) + 1.0) / 2.0


def inverse_energy(weight: float, similarity: torch.Tensor) -> torch.Tensor:
    return weight / (1.0 + BETA * similarity)


def _mean_or_none(x: torch.Tensor):
    return None if x.numel() == 0 else x.mean()


def _total(terms) -> torch.Tensor | None:
    """Sum of the terms that exist; None when every term was empty."""
    terms = [t for t in terms if t is not None]
    return None if not terms else torch.stack(terms).sum()


# --- Move / resize: raw cos in the edit and content terms, 0.5 per layer, inpaint without the 0.5 ----------


def move_edit(gen, ref_scaled, dest_cells, src_cells, w_edit):
    """Σ_f 0.5·w_edit / (1 + 4·mean cos(F[dest], Rˢ[src])), paired point-wise."""
    return _total(
        None if (m := _mean_or_none(cos(select(f, dest_cells), select(r, src_cells)))) is None
        else 0.5 * inverse_energy(w_edit, m)
        for f, r in zip(gen, ref_scaled)
    )


def move_content(gen, ref, other, non_overlap, region, w_content, w_contrast, w_inpaint):
    """Keep the background; push the vacated area away from the object and towards the reference region."""
    terms = []
    for f, r in zip(gen, ref):
        m = _mean_or_none(cos(select(r, other), select(f, other)))
        terms.append(None if m is None else 0.5 * inverse_energy(w_content, m))
        m = _mean_or_none(cos01(select(f, non_overlap), select(r, non_overlap)))
        terms.append(None if m is None else 0.5 * w_contrast * m)
        vacated, source = select(f, non_overlap), select(r, region)
        if vacated.shape[0] and source.shape[0]:
            terms.append(inverse_energy(w_inpaint, cos01(vacated.mean(0), source.mean(0))))
    return _total(terms)


# --- Drag: (cos+1)/2, 3x3 boxes paired point-wise, ÷ (2 layers · K pairs) ----------------------------------


def drag_edit(gen, ref, pairs, w_edit, w_inpaint):
    """pairs: list of (target_box_cells, handle_box_cells, handle_only_cells) per point pair."""
    terms = []
    for f, r in zip(gen, ref):
        for target_box, handle_box, handle_only in pairs:
            terms.append(inverse_energy(w_edit, cos01(select(f, target_box), select(r, handle_box)).mean()))
            m = _mean_or_none(cos01(select(f, handle_only), select(r, handle_only)))
            terms.append(None if m is None else w_inpaint * m)
    total = _total(terms)
    return None if total is None else total / (len(gen) * len(pairs))


def landmark_edit(gen, ref, pairs, w_edit):
    """Face (official `mode='landmark'`): Σ_f Σ_k w_edit / (1 + 4·mean cos01(F[target_k], R[landmark_k])) ÷ (2·K);
    pairs: (target_box_cells, landmark_box_cells) per landmark. No inpainting term."""
    terms = [inverse_energy(w_edit, cos01(select(f, target_box), select(r, handle_box)).mean())
             for f, r in zip(gen, ref) for target_box, handle_box in pairs]
    return torch.stack(terms).sum() / (len(gen) * len(pairs))


def drag_content(gen, ref, other, w_content):
    terms = [
        None if (m := _mean_or_none(cos01(select(r, other), select(f, other)))) is None
        else inverse_energy(w_content, m)
        for f, r in zip(gen, ref)
    ]
    total = _total(terms)
    return None if total is None else 0.5 * total


# --- Appearance / paste: (cos+1)/2, plain sum over the two layers ------------------------------------


def keep_background(gen, base, outside, w_content):
    """Σ_f w_content / (1 + 4·mean_{outside} cos01(F, Base))."""
    return _total(
        None if (m := _mean_or_none(cos01(select(f, outside), select(b, outside)))) is None
        else inverse_energy(w_content, m)
        for f, b in zip(gen, base)
    )


def appearance_edit(gen, ref, inside, ref_inside, w_edit):
    """Σ_f w_edit / (1 + 4·cos01(mean_{inside} F, mean_{ref_inside} Ref)): global appearance by mean vectors."""
    return _total(
        inverse_energy(w_edit, cos01(select(f, inside).mean(0), select(r, ref_inside).mean(0)))
        for f, r in zip(gen, ref)
    )


def paste_edit(gen, ref, dest_cells, src_cells, w_edit):
    """Σ_f w_edit / (1 + 4·mean cos01(F[dest], Ref[src])), paired point-wise."""
    return _total(
        inverse_energy(w_edit, cos01(select(f, dest_cells), select(r, src_cells)).mean()) for f, r in zip(gen, ref)
    )
