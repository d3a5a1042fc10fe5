"""Gradient checkpointing in the guided pass (`DragonPipeline.enable_gradient_checkpointing`, `--gradient-checkpointing`):
the backbones' written-out forwards honour diffusers' switch (the checkpointed blocks run again in the backward), and
the guidance gradients and the edited image are those of the run without it."""

import json

import numpy as np
import pytest
import torch

from conftest import make_scene
from dragondiff import EditSpec
from dragondiff.tiny import build_tiny_pipeline, save_tiny_model


def _watched_block(pipe):
    """A block the denoiser checkpoints (a UNet resnet, the first transformer block)."""
    denoiser = pipe.backbone.denoiser
    if hasattr(denoiser, "down_blocks"):
        return denoiser.down_blocks[0].resnets[0]
    return denoiser.transformer_blocks[0]


def _edit(pipe, spec):
    calls = []
    handle = _watched_block(pipe).register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        out = pipe.edit(spec, progress=False, return_intermediates=True)
    finally:
        handle.remove()
    return out, len(calls)


@pytest.mark.parametrize("layout, one_backward", [("sd1", False), ("sd1", True), ("sd3", False), ("sd3.5", True),
                                                  ("flux", False)])
def test_checkpointing_recomputes_the_guided_pass_and_changes_no_number(layout, one_backward):
    torch.manual_seed(0)
    pipe = build_tiny_pipeline(0, layout, device="cpu", dtype=torch.float32)
    pipe.one_backward = one_backward  # the batched backward (CUDA's default) recomputes under vmap
    img, disc, _ = make_scene(128)
    spec = EditSpec(task="move", image=img, mask=disc, offset=(16, 0), preset="official", num_inference_steps=3,
                    max_resolution=128)
    plain, plain_calls = _edit(pipe, spec)
    assert not pipe.denoiser.is_gradient_checkpointing
    assert pipe.enable_gradient_checkpointing() is pipe and pipe.denoiser.is_gradient_checkpointing
    saved, saved_calls = _edit(pipe, spec)
    guided = saved.pass_counts["feature_grad"]
    assert guided >= 1 and saved.pass_counts == plain.pass_counts
    # the checkpointed block starts once more per backward pass (two per guided step with two backward passes, one
    # batched): its forward again (a pre-hook: the recomputation stops once it has what the backward needs)
    assert saved_calls == plain_calls + saved.pass_counts["backward"]
    assert saved.pass_counts["backward"] == (1 if one_backward else 2) * guided
    assert len(saved.guidance) == len(plain.guidance) == guided
    for (_, _, a), (_, _, b) in zip(plain.guidance, saved.guidance):
        assert a.abs().sum() > 0
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    difference = np.abs(np.asarray(saved.image).astype(int) - np.asarray(plain.image).astype(int)).max()
    assert difference <= 1
    pipe.enable_gradient_checkpointing(False)
    assert not pipe.denoiser.is_gradient_checkpointing
    assert _edit(pipe, spec)[1] == plain_calls


def test_checkpointing_refuses_a_non_bool():
    pipe = build_tiny_pipeline(0, "sd1", device="cpu")
    with pytest.raises(TypeError, match="enabled: expected a bool"):
        pipe.enable_gradient_checkpointing("yes")


def test_the_cli_flag_turns_it_on_and_the_sidecar_records_it(tmp_path, capsys):
    from PIL import Image

    from dragondiff.cli import main
    from dragondiff.cli.runner import load_pipeline

    folder = save_tiny_model(tmp_path / "flux", "flux")
    assert load_pipeline(str(folder), None, "cpu", "float32", 1, gradient_checkpointing=True) \
        .denoiser.is_gradient_checkpointing
    assert not load_pipeline(str(folder), None, "cpu", "float32", 1).denoiser.is_gradient_checkpointing
    img, disc, _ = make_scene()
    Image.fromarray(img).save(tmp_path / "scene.png")
    Image.fromarray(disc.astype(np.uint8) * 255).save(tmp_path / "disc.png")
    common = ["move", str(tmp_path / "scene.png"), "--mask", str(tmp_path / "disc.png"), "--offset", "16,0",
              "--model", str(folder), "--steps", "3", "--max-resolution", "128", "--threads", "1", "-q"]
    assert main(common + ["-o", str(tmp_path / "plain.png")]) == 0, capsys.readouterr().err
    assert main(common + ["--gradient-checkpointing", "-o", str(tmp_path / "saved.png")]) == 0, \
        capsys.readouterr().err
    assert json.loads((tmp_path / "saved.json").read_text())["gradient_checkpointing"] is True
    assert json.loads((tmp_path / "plain.json").read_text())["gradient_checkpointing"] is False
    plain = np.asarray(Image.open(tmp_path / "plain.png")).astype(int)
    saved = np.asarray(Image.open(tmp_path / "saved.png")).astype(int)
    assert np.abs(plain - saved).max() <= 1
