"""Preset step schedules (reference-spec §5.1) and the DDIM timestep table."""

import pytest
import torch

from dragondiff.presets import OFFICIAL, PAPER, Preset, get_preset


def test_paper_schedule():
    assert [i for i in range(50) if PAPER.is_guided(i)] == list(range(30))
    assert all(PAPER.repeats(i) == 1 for i in range(50))
    assert not any(PAPER.has_sde(i) for i in range(50))
    assert PAPER.sde_strength == 0


def test_official_schedule():
    guided = [i for i in range(50) if OFFICIAL.is_guided(i)]
    assert guided == list(range(10)) + list(range(10, 29, 2))
    assert len(guided) == 20
    assert [i for i in range(50) if OFFICIAL.repeats(i) == 3] == [22, 24, 26, 28]
    assert sum(OFFICIAL.repeats(i) for i in guided) == 28  # guidance evaluations
    assert [i for i in range(50) if OFFICIAL.has_sde(i)] == list(range(11, 20))
    assert OFFICIAL.sde_strength == 0.4


def test_get_preset():
    assert get_preset("paper") is PAPER and get_preset(OFFICIAL) is OFFICIAL
    custom = Preset(name="x", guidance_until=10)
    assert get_preset(custom) is custom
    with pytest.raises(ValueError, match="preset"):
        get_preset("quick")


def test_ddim_table(tiny_pipe):
    s = tiny_pipe.schedule(50)
    alphas = tiny_pipe.rule.alphas_cumprod
    assert s.timesteps[0] == 981 and s.timesteps[-1] == 1
    assert s.time_after(0) == 961 and s.time_after(48) == 1 and s.time_after(49) == -1
    assert s.timesteps == list(range(981, 0, -20))
    assert all(torch.equal(s.levels[i], alphas[t]) for i, t in enumerate(s.timesteps))
    # ᾱ after the last step is final_alpha_cumprod = ᾱ_0 (set_alpha_to_one=False)
    assert s.levels[50].item() == pytest.approx(0.99915, abs=1e-6)
    assert torch.equal(s.levels[50], alphas[0])
