"""The speed benchmark's bookkeeping (not its numbers: timings are printed, never asserted) and the savings it
reports: a reused inversion's cached reference features, the bank size estimate, the `fast` preset's schedule."""

import json

import numpy as np

from dragondiff.backbone import estimate_bank_bytes
from dragondiff.bench.speed import main as speed_main
from dragondiff.presets import FAST, OFFICIAL


def test_bench_speed_smoke(tmp_path, capsys):
    out = tmp_path / "speed.json"
    assert speed_main(["--tasks", "move", "appearance", "--presets", "fast", "--steps", "4", "--threads", "1",
                       "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["meta"]["model"] == "tiny" and data["meta"]["one_backward"] is False  # CPU: two backward passes
    assert set(data["pass_seconds"]) == {"unet_forward_b1", "unet_forward_b2", "feature_forward",
                                         "feature_forward_grad", "backward"}
    rows = {r["task"]: r for r in data["rows"]}
    assert set(rows) == {"move", "appearance"}
    move, app = rows["move"], rows["appearance"]
    # first edit = invert call + edit; the later edit inverts nothing and reads the base image's features
    assert move["passes_first"]["inversion_unet"] == 4 and move["passes_later"]["inversion_unet"] == 0
    assert move["passes_later"]["feature_cached"] == move["passes_first"]["feature_grad"] > 0
    assert move["passes_later"]["feature_nograd"] == 0
    assert app["passes_later"]["inversion_unet"] == 4  # the reference image is inverted by every edit
    assert app["passes_official"]["feature_nograd"] == 2 * app["passes_first"]["feature_grad"]
    assert app["passes_official"]["backward"] == app["passes_first"]["backward"] == 2 * app["passes_first"]["feature_grad"]
    for r in data["rows"]:
        assert r["first_edit_s"] > 0 and r["peak_memory_first_bytes"] > 0 and r["inversion_bytes"] > 0
        assert set(r["phases_first_s"]) >= {"invert_call", "cfg", "reference_features", "guidance", "decode"}
    printed = capsys.readouterr().out
    assert "| move | fast | 4 |" in printed and "FE = one batch-1 UNet forward" in printed


def test_bank_estimate_matches_the_captured_bank(tiny_pipe):
    img = np.zeros((128, 128, 3), np.uint8)
    inv = tiny_pipe.invert(img, num_inference_steps=3, max_resolution=128, progress=False)
    hw = tuple(inv.latents.shape[-2:])
    assert estimate_bank_bytes(tiny_pipe.unet, hw, 3) == inv.bank.nbytes > 0
    assert estimate_bank_bytes(tiny_pipe.unet, hw, 3, images=2) == 2 * inv.bank.nbytes
    assert inv.bank.storage_device.type == "cpu"


def test_fast_preset_schedule():
    """20 steps on the 50-step grid: one guided pass at every grid step below 40 (16 of 20), gradient x1.5; SDE at
    the grid steps inside (11, 19)."""
    grid = [i * 50 // FAST.steps for i in range(FAST.steps)]
    guided = [g for g in grid if FAST.is_guided(g)]
    assert guided == [0, 2, 5, 7, 10, 12, 15, 17, 20, 22, 25, 27, 30, 32, 35, 37]
    assert FAST.guidance_gain == 1.5 and OFFICIAL.guidance_gain == 1.0
    assert all(FAST.repeats(g) == 1 for g in grid)
    assert [g for g in grid if FAST.has_sde(g)] == [12, 15, 17]
    assert OFFICIAL.steps == 50 and FAST.steps == 20


def test_fast_preset_is_the_default_step_count(tiny_pipe):
    img = np.zeros((128, 128, 3), np.uint8)
    mask = np.zeros((128, 128), bool)
    mask[40:70, 40:70] = True
    out = tiny_pipe.move(img, mask, offset=(10, 0), preset="fast", max_resolution=128, progress=False)
    assert out.pass_counts["inversion_unet"] == 20 and out.pass_counts["cfg_unet"] == 20
    assert out.pass_counts["feature_grad"] == 16 and out.pass_counts["time_travel_unet"] == 0
    inv = tiny_pipe.invert(img, preset="fast", max_resolution=128, progress=False)
    assert inv.num_inference_steps == 20


def test_vae_tiling_runs_the_vae_in_tiles():
    """With tiling on (64 px tiles on a 128 px working size) an edit encodes and decodes tile by tile and still
    gives a full-size image; off again, the untiled path is back and the result is bit-identical to a pipeline
    that never tiled."""
    import pytest

    from dragondiff.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(seed=0, device="cpu")
    calls = {"encode": 0, "decode": 0}
    enc, dec = pipe.vae._tiled_encode, pipe.vae.tiled_decode

    def count_encode(*a, **k):
        calls["encode"] += 1
        return enc(*a, **k)

    def count_decode(*a, **k):
        calls["decode"] += 1
        return dec(*a, **k)

    pipe.vae._tiled_encode, pipe.vae.tiled_decode = count_encode, count_decode
    img = np.zeros((128, 128, 3), np.uint8)
    img[40:80, 30:70] = (200, 30, 30)
    mask = np.zeros((128, 128), bool)
    mask[40:80, 30:70] = True
    kw = dict(offset=(16, 0), max_resolution=128, num_inference_steps=3, progress=False)
    plain = pipe.move(img, mask, **kw)
    assert calls == {"encode": 0, "decode": 0}
    tiled = pipe.enable_vae_tiling(tile_px=64).move(img, mask, **kw)
    assert calls["encode"] >= 1 and calls["decode"] >= 1 and tiled.image.size == (128, 128)
    again = pipe.enable_vae_tiling(False).move(img, mask, **kw)
    assert np.array_equal(np.asarray(plain.image), np.asarray(again.image))
    with pytest.raises(ValueError, match="tile_px"):
        pipe.enable_vae_tiling(tile_px=4)


def test_channels_last_is_opt_in_close_to_the_default_and_reversible():
    import pytest
    import torch

    from conftest import TINY_MODEL, make_scene
    from dragondiff import EditSpec
    from dragondiff.cli.runner import load_pipeline
    from dragondiff.tiny import build_tiny_pipeline

    img, disc, _ = make_scene(128)
    spec = EditSpec(task="move", image=img, mask=disc, offset=(12, 4), preset="fast", num_inference_steps=4,
                    max_resolution=128)
    pipe = build_tiny_pipeline(seed=0, device="cpu")
    assert not pipe.backbone.channels_last  # the default layout: earlier spec files rerun bit for bit
    default = np.asarray(pipe.edit(spec, progress=False).image).astype(int)
    pipe.enable_channels_last()
    assert pipe.backbone.channels_last and pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert pipe.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    pipe.to(dtype=torch.float32)
    assert pipe.backbone.channels_last  # moves and casts keep the layout
    faster = pipe.edit(spec, progress=False)
    assert faster.energies and np.abs(np.asarray(faster.image).astype(int) - default).max() <= 2
    assert pipe.uses_one_backward is False  # vmap cannot batch channels-last convolutions' backward
    pipe.one_backward = True
    with pytest.raises(ValueError, match="one_backward=True: the batched backward"):
        pipe.edit(spec, progress=False)
    pipe.one_backward = None
    pipe.enable_channels_last(False)
    assert not pipe.backbone.channels_last
    assert np.array_equal(np.asarray(pipe.edit(spec, progress=False).image).astype(int), default)
    loaded = load_pipeline(str(TINY_MODEL), None, "cpu", "float32", torch.get_num_threads(), channels_last=True)
    assert loaded.backbone.channels_last  # the command-line flag
