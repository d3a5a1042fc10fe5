"""dtype "auto" (the default): bf16 for an SD-size model on a CPU with native bf16, fp32 for small models and on
CPUs without it, fp16 on CUDA (bf16 for the flow transformers); `dragondiff run` re-runs a sidecar in the dtype it
recorded, with a note when this machine would pick another."""

import types
import warnings

import pytest
import torch

from dragondiff import loading
from dragondiff.cli.edits import InputError, note_recorded_dtype, recorded_dtype
from dragondiff.errors import InputNote


def _backbone(params: int, rule: str = "ddim"):
    with torch.device("meta"):  # no memory: only the parameter count is read
        denoiser = torch.nn.Linear(params // 1000, 1000, bias=False)
    return types.SimpleNamespace(denoiser=denoiser, RULE=rule)


@pytest.mark.parametrize("native", [True, False])
def test_auto_picks_bf16_only_for_an_sd_size_model_on_a_cpu_with_native_bf16(monkeypatch, native):
    monkeypatch.setattr(loading, "native_bf16", lambda: native)
    cpu = torch.device("cpu")
    big, small = _backbone(loading.AUTO_BF16_MIN_PARAMS), _backbone(loading.AUTO_BF16_MIN_PARAMS - 1000)
    assert loading.auto_dtype(cpu, big) == (torch.bfloat16 if native else torch.float32)
    assert loading.auto_dtype(cpu, small) == torch.float32  # the bundled model's size: bf16 measured slower
    cuda = torch.device("cuda")
    assert loading.auto_dtype(cuda, big) == torch.float16
    assert loading.auto_dtype(cuda, _backbone(1000, "flow-euler")) == torch.bfloat16
    assert loading.auto_dtype(torch.device("mps"), big) == torch.float32


def test_the_pipeline_default_is_auto(monkeypatch):
    from dragondiff.tiny import build_tiny_pipeline

    monkeypatch.setattr(loading, "native_bf16", lambda: True)
    assert build_tiny_pipeline(0, device="cpu").dtype == torch.float32  # a tiny model stays fp32
    assert build_tiny_pipeline(0, device="cpu", dtype="auto").dtype == torch.float32
    with pytest.raises(ValueError, match="dtype: 'fast' is not supported"):
        build_tiny_pipeline(0, device="cpu", dtype="fast")


def test_run_takes_the_sidecars_dtype_unless_given():
    opts = {"dtype": None}
    recorded_dtype([{"id": "m", "dtype": "bfloat16"}], opts)
    assert opts["dtype"] == "bfloat16" and opts["dtype_recorded"]
    given = {"dtype": "float32"}
    recorded_dtype([{"id": "m", "dtype": "bfloat16"}], given)
    assert given == {"dtype": "float32"}
    untouched = {"dtype": None}
    recorded_dtype([{"id": "m"}], untouched)  # an older sidecar without a dtype: the default
    assert untouched == {"dtype": None}
    with pytest.raises(InputError, match="the sidecars ran in different dtypes \\(bfloat16, float32\\)"):
        recorded_dtype([{"id": "m", "dtype": "bfloat16"}, {"id": "m", "dtype": "float32"}], {"dtype": None})


def test_a_note_when_this_machine_would_pick_another_dtype(monkeypatch):
    monkeypatch.setattr(loading, "native_bf16", lambda: True)
    big = _backbone(loading.AUTO_BF16_MIN_PARAMS)
    pipe = types.SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32, backbone=big)
    with pytest.warns(InputNote, match="re-running in float32 as the sidecar recorded; on this machine --dtype auto "
                                       "would pick bfloat16"):
        note_recorded_dtype(pipe)
    pipe.dtype = torch.bfloat16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        note_recorded_dtype(pipe)  # the same as auto: nothing to say


def test_the_cli_takes_dtype_auto(tmp_path):
    import numpy as np
    from PIL import Image

    from conftest import TINY_MODEL, make_scene
    from test_cli import cli

    img, disc, _ = make_scene()
    Image.fromarray(img).save(tmp_path / "scene.png")
    Image.fromarray(disc.astype(np.uint8) * 255).save(tmp_path / "disc.png")
    args = ["move", str(tmp_path / "scene.png"), "--mask", str(tmp_path / "disc.png"), "--offset", "16,0",
            "--model", str(TINY_MODEL), "--dry-run", "--dtype"]
    out = cli(*args, "auto")
    assert out.returncode == 0, out.stderr
    out = cli(*args, "fast")
    assert out.returncode == 2 and "--dtype: 'fast' is not supported" in out.stderr
