"""The trainer's data path and stages: the torch renderer draws what the numpy scene generator draws, and each
stage runs, resumes and exports (a few steps, in a temporary folder)."""

import json

import numpy as np
import pytest
import torch

from dragondiff.shapes import model as shapes_model
from dragondiff.train.render_torch import captions, render_batch
from dragondiff.shapes.scenes import Shape, random_layout, random_scene, render, rescaled


def test_torch_renderer_matches_the_scene_generator():
    seeds = range(300, 364)
    layouts = [random_layout(s) for s in seeds]
    images, masks = render_batch(layouts, with_masks=True)
    for k, seed in enumerate(seeds):
        scene = random_scene(seed)
        got = images[k].permute(1, 2, 0).numpy().astype(int)
        diff = np.abs(got - scene.image.astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3  # float rounding at a few anti-aliased edges
        for j, m in enumerate(scene.masks):
            assert np.array_equal(masks[k, j].numpy(), m)
        assert captions([layouts[k]])[0] == scene.caption


def test_torch_renderer_at_256_draws_the_layouts_twice_as_large():
    seeds = range(400, 408)
    images, masks = render_batch([random_layout(s) for s in seeds], size=256, with_masks=True)
    assert images.shape == (8, 3, 256, 256)
    for k, seed in enumerate(seeds):
        scene = rescaled(random_scene(seed), 256)
        diff = np.abs(images[k].permute(1, 2, 0).numpy().astype(int) - scene.image.astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
        for j, m in enumerate(scene.masks):
            assert np.array_equal(masks[k, j].numpy(), m)
            assert m.sum() == pytest.approx(4 * random_scene(seed).masks[j].sum(), rel=0.05)


def test_torch_renderer_draws_each_kind_and_pads_short_layouts():
    shapes = [Shape("triangle", "red", 40.0, 50.0, 20.0), Shape("square", "blue", 95.0, 90.0, 14.0)]
    layouts = [(shapes, ("white", "black", 1.0)), ([Shape("circle", "green", 64.0, 64.0, 25.0)], ("red", None, 0.0))]
    images = render_batch(layouts)
    for k, (s, bg) in enumerate(layouts):
        assert np.abs(images[k].permute(1, 2, 0).numpy() - render(s, bg)[0]).max() <= 1


@pytest.mark.skipif(not shapes_model.is_available(), reason="bundled weights not in this checkout")
def test_stages_resume_from_shipped_weights_and_export(tmp_path):
    from dragondiff.train import shapes as train

    torch.manual_seed(0)
    out, dest = tmp_path / "run", tmp_path / "weights"
    shipped_vae = train._shipped_vae()
    # Tiny budgets: 2 VAE steps (decoder only: the encoder, i.e. the latent space, must not move) and 2 UNet steps.
    vae = train.train_vae(out, steps=2, minutes=5, device=torch.device("cpu"), batch=2)
    for a, b in zip(vae.encoder.parameters(), shipped_vae.encoder.parameters()):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(vae.decoder.parameters(), shipped_vae.decoder.parameters()))
    train.train_unet(out, steps=2, minutes=5, device=torch.device("cpu"), batch=2, pool_size=8, refresh_count=4)
    state = torch.load(out / "unet.pt", weights_only=True)
    assert state["step"] == 2 and state["origin"] == "shipped"
    # the latent scale of the shipped UNet is kept: it learned that latent space
    assert state["scale"] == pytest.approx(shipped_vae.config.scaling_factor)
    # resuming with a larger schedule continues from step 2
    train.train_unet(out, steps=3, minutes=5, device=torch.device("cpu"), batch=2, pool_size=8, refresh_count=4)
    assert torch.load(out / "unet.pt", weights_only=True)["step"] == 3
    logs = sorted(out.glob("log-unet-*.json"))
    log = json.loads(logs[-1].read_text())
    assert log["step"] == 3 and log["samples_seen"] == 6 and log["device"] == "cpu" and log["points"]
    train.export(out, dest)
    files = [p for p in dest.rglob("*") if p.is_file()]
    assert max(p.stat().st_size for p in files) <= 16 * 2**20
    from dragondiff import DragonPipeline

    pipe = DragonPipeline.from_pretrained(dest, device="cpu", local_files_only=True)
    assert pipe.vae.config.scaling_factor == pytest.approx(state["scale"])
    rounds = json.loads((dest / "model_index.json").read_text())["dragondiff_training"]["rounds"]
    assert rounds[-1]["unet_steps"] == 3

