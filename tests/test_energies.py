"""Each energy term against values computed by hand on tiny feature maps (reference-spec §6)."""

import math

import pytest
import torch

from dragondiff import energies as E

X, Y = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])  # orthogonal: cos 0, cos01 0.5


def fmap(cells):
    """(1, 3, 2, 2) map with given channel vectors at {(y, x): vec}; other cells = X."""
    f = X.view(1, 3, 1, 1).repeat(1, 1, 2, 2)
    for (y, x), v in cells.items():
        f[0, :, y, x] = v
    return f


def mask(*cells):
    m = torch.zeros(2, 2, dtype=torch.bool)
    for y, x in cells:
        m[y, x] = True
    return m


def test_cos_variants():
    assert E.cos(X, -X).item() == pytest.approx(-1)
    assert E.cos01(X, -X).item() == pytest.approx(0)
    assert E.cos01(X, Y).item() == pytest.approx(0.5)


def test_move_edit_uses_raw_cos_and_half_layer_weight():
    gen = [fmap({(0, 0): -X})] * 2
    ref = [fmap({})] * 2
    # cos(-X, X) = -1 (raw): per layer 0.5 * 4 / (1 + 4 * -1) = -2/3; two layers: -4/3.  cos01 would give +4.
    e = E.move_edit(gen, ref, mask((0, 0)), mask((0, 0)), w_edit=4.0)
    assert e.item() == pytest.approx(-4 / 3)
    # Point-wise pairing follows the given cell order: (1,1) in gen against (0,0) in ref.
    e = E.move_edit([fmap({(1, 1): Y})], [fmap({})], (torch.tensor([1]), torch.tensor([1])),
                    (torch.tensor([0]), torch.tensor([0])), w_edit=4.0)
    assert e.item() == pytest.approx(0.5 * 4 / (1 + 0))


def test_move_content_terms():
    # background cell (0,1): cos 1 -> 0.5*6/5 per layer; vacated cell (0,0): gen Y vs ref X -> cos01 0.5
    gen = [fmap({(0, 0): Y})] * 2
    ref = [fmap({})] * 2
    other, vacated, region = mask((0, 1)), mask((0, 0)), mask((1, 1))
    e = E.move_content(gen, ref, other, vacated, region, w_content=6.0, w_contrast=0.2, w_inpaint=0.8)
    content = 2 * 0.5 * 6.0 / (1 + 4 * 1.0)
    contrast = 2 * 0.5 * 0.2 * 0.5
    inpaint = 2 * 0.8 / (1 + 4 * 0.5)  # mean vectors Y vs X: cos01 0.5; no 0.5 layer factor
    assert e.item() == pytest.approx(content + contrast + inpaint)


def test_move_content_skips_empty_vacated_area():
    gen, ref = [fmap({})], [fmap({})]
    e = E.move_content(gen, ref, mask((0, 1)), mask(), mask((1, 1)), 6.0, 0.2, 0.8)
    assert e.item() == pytest.approx(0.5 * 6.0 / 5.0)
    assert E.move_edit(gen, ref, mask(), mask(), 4.0) is None


def test_drag_divides_by_two_layers_times_pairs():
    gen = [fmap({(0, 0): Y})] * 2
    ref = [fmap({})] * 2
    box_t = (torch.tensor([0, 0]), torch.tensor([0, 1]))  # gen cells (0,0)=Y, (0,1)=X
    box_h = (torch.tensor([1, 1]), torch.tensor([0, 1]))  # ref cells X, X -> cos01 0.5 and 1, mean 0.75
    handle_only = mask((1, 0))  # gen X vs ref X -> cos01 1
    pairs = [(box_t, box_h, handle_only)] * 3
    per = 4.0 / (1 + 4 * 0.75) + 0.2 * 1.0
    e = E.drag_edit(gen, ref, pairs, w_edit=4.0, w_inpaint=0.2)
    assert e.item() == pytest.approx(per * 2 * 3 / (2 * 3))
    content = E.drag_content(gen, ref, mask((0, 0), (1, 1)), w_content=6.0)  # cos01 0.5 and 1 -> mean 0.75
    assert content.item() == pytest.approx(0.5 * 2 * 6.0 / (1 + 4 * 0.75))


def test_appearance_compares_mean_vectors_and_sums_layers():
    gen = [fmap({(0, 0): Y, (0, 1): -X})] * 2  # mean over {(0,0),(0,1)} = (-0.5, 0.5, 0)
    ref = [fmap({(1, 1): Y})] * 2  # mean over {(1,0),(1,1)} = (0.5, 0.5, 0)
    e = E.appearance_edit(gen, ref, mask((0, 0), (0, 1)), mask((1, 0), (1, 1)), w_edit=3.5)
    # cos of the means = 0 -> cos01 0.5; per layer 3.5 / 3; summed over 2 layers (no /2)
    assert e.item() == pytest.approx(2 * 3.5 / 3)
    keep = E.keep_background(gen, [fmap({})] * 2, mask((1, 0), (0, 1)), w_content=5.0)
    # cells: (1,0) X vs X -> 1 ; (0,1) -X vs X -> 0 ; mean 0.5
    assert keep.item() == pytest.approx(2 * 5.0 / (1 + 4 * 0.5))


def test_paste_pairs_destination_with_source():
    gen = [fmap({(1, 1): Y})]
    ref = [fmap({(0, 0): Y})]
    dest = (torch.tensor([1]), torch.tensor([1]))
    src = (torch.tensor([0]), torch.tensor([0]))
    assert E.paste_edit(gen, ref, dest, src, w_edit=4.0).item() == pytest.approx(4.0 / 5.0)
    src_wrong = (torch.tensor([1]), torch.tensor([0]))  # X: cos01 0.5
    assert E.paste_edit(gen, ref, dest, src_wrong, w_edit=4.0).item() == pytest.approx(4.0 / 3.0)


def test_inverse_energy_form():
    assert E.inverse_energy(2.0, torch.tensor(0.25)).item() == pytest.approx(1.0)
    assert math.isclose(E.BETA, 4.0)
