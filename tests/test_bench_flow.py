"""`bench memory` and the work-per-edit estimate on any backbone (tiny layouts here; the full-size sd35m-shaped and
flux-shaped rows are in docs/results/memory-flow-1024.json): the flow transformers' estimates run, the pass
counts worked out from a preset are the sampler's, and gradient checkpointing shows where it should."""

import json

import pytest
import torch

from conftest import make_scene
from dragondiff import EditSpec
from dragondiff.bench.memory import estimate
from dragondiff.bench.memory import main as memory_main
from dragondiff.bench.speed import estimate_work, preset_pass_counts
from dragondiff.tiny import SHAPED, build_tiny_pipeline


@pytest.mark.parametrize("layout, preset, steps, task, one_backward, time_travel", [
    ("sd3", "official", 13, "move", True, True),  # step 8 of 13 sits on grid step 26: three repeats
    ("flux", "fast", 8, "move", False, False),
    ("sd3.5", "official", 6, "paste", True, False),  # no step of 6 on an even grid step in 22..28
])
def test_pass_counts_from_the_preset_are_the_sampler_s(layout, preset, steps, task, one_backward, time_travel):
    pipe = build_tiny_pipeline(0, layout, device="cpu")
    pipe.one_backward = one_backward
    img, disc, _ = make_scene(128)
    if task == "move":
        spec = EditSpec(task="move", image=img, mask=disc, offset=(16, 0), preset=preset, num_inference_steps=steps,
                        max_resolution=128)
    else:
        spec = EditSpec(task="paste", image=img, reference=img, reference_mask=disc, offset=(16, 0), preset=preset,
                        num_inference_steps=steps, max_resolution=128)
    images = 2 if task == "paste" else 1
    counted = pipe.edit(spec, progress=False).pass_counts
    assert preset_pass_counts(preset, steps, images=images, one_backward=one_backward) == counted
    assert counted["feature_grad"] > 0 and (counted["time_travel_unet"] > 0) == time_travel


def test_work_per_edit_counts_each_kind_of_pass():
    sd3 = estimate_work("tiny-sd3", 128, torch.float32)
    flux = estimate_work("tiny-flux", 128, torch.float32)
    saved = estimate_work("tiny-flux", 128, torch.float32, gradient_checkpointing=True)
    for result in (sd3, flux):
        per_pass = result["pass_flops"]
        # the feature pass stops after its last feature block: less work than the whole network
        assert 0 < per_pass["feature_forward"] < per_pass["denoiser_forward"]
        assert per_pass["feature_backward"] > 0
        official, fast = result["presets"]["official"], result["presets"]["fast"]
        assert official["flops"] > fast["flops"] > 0 and (official["steps"], fast["steps"]) == (50, 20)
        assert official["passes"] == preset_pass_counts("official")
    # FLUX.1-dev without true CFG: one branch per CFG call; SD3: two
    assert (sd3["pass_flops"]["cfg_batch"], flux["pass_flops"]["cfg_batch"]) == (2, 1)
    cfg = flux["presets"]["official"]["flops_by_kind"]["cfg"]
    assert cfg == flux["presets"]["official"]["passes"]["cfg_unet"] * flux["pass_flops"]["denoiser_forward"]
    # checkpointing adds one feature forward per backward pass, nothing else
    for preset in ("official", "fast"):
        extra = saved["presets"][preset]["flops"] - flux["presets"][preset]["flops"]
        assert extra == flux["presets"][preset]["passes"]["backward"] * flux["pass_flops"]["feature_forward"] > 0


@pytest.mark.parametrize("layout", ["sd3", "sd3.5", "flux"])
def test_bench_memory_estimates_flow_layouts_and_checkpointing_shrinks_the_guidance_pass(layout):
    plain = estimate(f"tiny-{layout}", 256, torch.float32, steps=2)
    saved = estimate(f"tiny-{layout}", 256, torch.float32, steps=2, gradient_checkpointing=True)
    assert plain["backbone"] == ("FLUX.1" if layout == "flux" else "SD3") and plain["model_time"] == 500.0
    assert plain["bank_bytes"] > 0 and plain["weights_bytes"] == sum(plain["weights_by_part_bytes"].values())
    assert plain["latents_bytes"] == 3 * 16 * 32 * 32 * 4  # 16 latent channels, fp32, steps + 1 latents
    assert saved["pass_peak_bytes"]["guidance"] < plain["pass_peak_bytes"]["guidance"]
    assert {k: v for k, v in saved["pass_peak_bytes"].items() if k != "guidance"} == \
        {k: v for k, v in plain["pass_peak_bytes"].items() if k != "guidance"}


def test_bench_memory_check_runs_a_flow_edit_for_real(tmp_path, capsys):
    out = tmp_path / "flux.json"
    assert memory_main(["--model", "tiny-flux", "--size", "128", "--steps", "2", "--bank-device", "cpu", "--check",
                        "--gradient-checkpointing", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["measured_bytes"] > 0 and result["gradient_checkpointing"] and result["cfg_batch"] == 1
    assert "check: held beyond the weights" in capsys.readouterr().out
    assert {"sd35m-shaped", "flux-shaped"} <= set(SHAPED)


def test_bench_speed_estimate_prints_and_saves_the_work_per_edit(tmp_path, capsys):
    from dragondiff.bench.speed import main as speed_main

    out = tmp_path / "work.json"
    assert speed_main(["--model", "tiny-sd3.5", "--estimate", "--presets", "fast", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert list(result["presets"]) == ["fast"] and result["presets"]["fast"]["flops"] > 0
    assert result["dtype"] == "bfloat16" and "PFLOP per edit" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--estimate takes one of"):
        speed_main(["--model", "bundled", "--estimate"])
