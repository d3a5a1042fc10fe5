"""Numerical parity with the official implementation on the tiny random model (tests/data/parity, copied from
shared/parity). Tolerances are those of its README, as max |Δ| / max |ref|, checked at every step of a free
run (no teacher forcing: errors would accumulate, so this is stricter than per-step forcing)."""

import json

import numpy as np
import pytest
from PIL import Image

from conftest import PARITY

TOL_INV = 1e-4
TOL_STEP = 1e-3  # eps_cfg, g, latent after each step
TOL_FINAL = 2e-3
TOL_ENERGY = 1e-4


def rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


def run_config(pipe, name):
    cfg = json.loads((PARITY / f"{name}.json").read_text())
    common = dict(prompt=cfg["prompt"], preset="paper", max_resolution=cfg["max_resolution"],
                  guidance_scale=cfg["guidance_scale"], energy_scale=cfg["energy_scale_slider"],
                  w_edit=cfg["w_edit"], w_content=cfg["w_content"], w_inpaint=cfg["w_inpaint"],
                  return_intermediates=True, progress=False)
    image = PARITY / "inputs" / "image.png"
    if cfg["mode"] == "move":
        (hx, hy), (tx, ty) = cfg["point_pairs_xy"][0]
        return pipe.move(image, PARITY / "inputs" / "object_mask.png", offset=(tx - hx, ty - hy),
                         w_contrast=cfg["w_contrast"], **common)
    mask = np.array(Image.open(PARITY / "inputs" / "drag_mask.png")) > 0
    return pipe.drag(image, [tuple(map(tuple, p)) for p in cfg["point_pairs_xy"]], mask.astype(np.uint8), **common)


@pytest.fixture(scope="module", params=["P-move", "P-drag"])
def parity_run(request, parity_pipe):
    return request.param, run_config(parity_pipe, request.param), np.load(PARITY / f"{request.param}.npz")


def test_inversion_and_initial_latent(parity_run):
    _, out, ref = parity_run
    assert out.inverted_latents.shape == ref["inv_latents"].shape
    assert rel(out.inverted_latents, ref["inv_latents"]) < TOL_INV
    assert rel(out.z_T, ref["zT"]) < TOL_INV


def test_every_step_matches(parity_run):
    name, out, ref = parity_run
    eps = np.stack([e.numpy() for _, _, e in out.eps_cfg])
    guid = np.stack([g.numpy() for _, _, g in out.guidance])
    np.testing.assert_array_equal([(i, r) for i, r, _ in out.guidance], ref["g_index"])
    np.testing.assert_array_equal([(i, r) for i, r, _ in out.eps_cfg], ref["eps_cfg_index"])
    for i in range(50):
        assert rel(eps[i], ref["eps_cfg_all"][i]) < TOL_STEP, f"{name} eps_cfg at step {i}"
        assert rel(out.latents[i], ref["latent_after_step"][i]) < TOL_STEP, f"{name} latent after step {i}"
    for k in range(len(guid)):
        assert rel(guid[k], ref["g_all"][k]) < TOL_STEP, f"{name} guidance #{k}"
    energies = np.array([e[2:] for e in out.energies])
    assert np.abs(energies - ref["energy_all"]).max() / np.abs(ref["energy_all"]).max() < TOL_ENERGY


def test_final_latent_and_image(parity_run):
    _, out, ref = parity_run
    assert rel(out.latents[-1], ref["final_latent"]) < TOL_FINAL
    diff = np.abs(np.asarray(out.image).astype(int) - ref["final_image"].astype(int))
    assert diff.max() <= 2 and (diff <= 1).mean() >= 0.99


def test_task_masks_match_official(parity_run):
    name, out, ref = parity_run
    if name == "P-move":
        np.testing.assert_array_equal(out.masks["destination_cells"], ref["mask_cur"][0, 0])
        np.testing.assert_array_equal(out.masks["source_cells"] & ~out.masks["destination_cells"],
                                      ref["mask_non_overlap"][0, 0])
        np.testing.assert_array_equal(out.masks["background_cells"], ref["mask_other"][0, 0])
    else:
        np.testing.assert_array_equal(out.masks["handle_boxes"], ref["mask_tar"])
        np.testing.assert_array_equal(out.masks["target_boxes"], ref["mask_cur"])
        np.testing.assert_array_equal(out.masks["background_cells"], ref["mask_other"][0, 0])
