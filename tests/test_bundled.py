"""The bundled shapes models (the UNet model and the flow transformer): load offline from the installed package,
and edits behave on them."""

import json

import numpy as np
import pytest

from dragondiff import DragonPipeline
from dragondiff.bench.shapes import evaluate, run_edit, vae_roundtrip
from dragondiff.shapes import model as shapes_model
from dragondiff.bench.cases import make_case
from dragondiff.loading import BUNDLED_FLOW_ID, BUNDLED_ID

pytestmark = pytest.mark.skipif(not shapes_model.is_available(), reason="bundled weights not trained yet")
MODELS = [BUNDLED_ID, BUNDLED_FLOW_ID]
_LOADED = {}


@pytest.fixture(scope="module")
def bundled():
    return DragonPipeline.bundled(device="cpu")


@pytest.fixture(params=MODELS)
def each(request):
    """Each bundled model, loaded once per module."""
    if request.param not in _LOADED:
        _LOADED[request.param] = DragonPipeline.bundled(request.param, device="cpu")
    return _LOADED[request.param]


def test_loads_offline_from_the_package(bundled):
    files = [p for p in shapes_model.WEIGHTS.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 25 * 2**20
    assert not [p for p in files if p.suffix in (".bin", ".ckpt", ".pt")]  # safetensors only
    assert type(bundled.unet).__name__ == "UNet2DConditionModel"
    assert bundled.unet.config.down_block_types[0] == "CrossAttnDownBlock2D"
    assert bundled.vae.config.latent_channels == 4 and len(bundled.vae.config.block_out_channels) == 4
    same = DragonPipeline.from_pretrained("dragondiff:shapes", device="cpu")
    assert all((a == b).all() for a, b in zip(same.unet.parameters(), bundled.unet.parameters()))


def test_the_flow_model_loads_offline_from_the_package():
    pipe = DragonPipeline.bundled(BUNDLED_FLOW_ID, device="cpu")
    files = [p for p in shapes_model.FLOW_WEIGHTS.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 20 * 2**20
    assert not [p for p in files if p.suffix in (".bin", ".ckpt", ".pt")]  # safetensors only
    assert type(pipe.backbone.denoiser).__name__ == "SD3Transformer2DModel" and pipe.backbone.describe()["clips"] == 1
    assert pipe.default_max_resolution == 128 and pipe.rule.NAME == "flow-euler" and pipe.scheduler_config["shift"] == 1
    own = json.loads((shapes_model.FLOW_WEIGHTS / "dragondiff_defaults.json").read_text())["settings"]
    assert pipe.recommended_settings == own  # its own settings file, not SD3's defaults


@pytest.mark.parametrize("task", ["move", "resize", "drag", "appearance", "paste"])
def test_one_benchmark_case_per_task(each, task):
    case = make_case(task, 0)
    out = run_edit(each, case, "official", num_inference_steps=10)
    metrics = evaluate(each, case, np.asarray(out.image))
    # "vacated" is undefined (NaN) when the enlarged object covers its whole source area
    numbers = [v for k, v in metrics.items() if k not in ("success", "vacated")]
    assert numbers and all(np.isfinite(v) for v in numbers)
    assert isinstance(metrics["success"], bool)


def test_move_beats_the_no_guidance_baseline(each):
    """Against the benchmark's trivial baseline (the model's reconstruction: nothing moves)."""
    case = make_case("move", 0)
    edited = evaluate(each, case, np.asarray(run_edit(each, case, "official").image))
    recon = evaluate(each, case, vae_roundtrip(each, case.scene.image[None])[0])
    assert edited["centroid_err_px"] < recon["centroid_err_px"] / 2
    assert edited["vacated"] > recon["vacated"]
