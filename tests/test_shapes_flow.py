"""The bundled flow model's layout and training: SD3Backbone's one-CLIP layout (no second CLIP, no T5 block), the
flow training stage and its export loading through the library, conditioning at training time equal to the
backbone's, and the refusals of the new surfaces (bundled names, one-CLIP parts)."""

import json

import numpy as np
import pytest
import torch

from dragondiff import DragonPipeline, EditSpec
from dragondiff.backbone_sd3 import SD3Backbone
from dragondiff.loading import BUNDLED_FLOW_ID, BUNDLED_IDS
from dragondiff.shapes import model as M
from dragondiff.shapes.tokenizer import build_tokenizer
from dragondiff.tiny_sd3 import build_tiny_sd3

CAPTION = "a red circle and a blue square on a green background"


def _one_clip(parts, text_encoder=None):
    """SD3 parts with the second CLIP and T5 left out and the transformer's pooled width fitted to the first."""
    from diffusers import SD3Transformer2DModel

    cfg = dict(parts["transformer"].config)
    cfg["pooled_projection_dim"] = parts["text_encoder"].config.projection_dim
    transformer = SD3Transformer2DModel.from_config(cfg).eval()
    return SD3Backbone(transformer, parts["vae"], text_encoder or parts["text_encoder"], parts["tokenizer"], None,
                       None)


def test_one_clip_layout_conditions_on_that_clip_alone_without_a_t5_block():
    parts = build_tiny_sd3(seed=0, with_t5=False)
    backbone = _one_clip(parts)
    cond = backbone.condition([CAPTION])
    ids = parts["tokenizer"]([CAPTION], padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids
    out = parts["text_encoder"](ids, output_hidden_states=True)
    joint = parts["transformer"].config.joint_attention_dim
    assert cond.text.shape == (1, 77, joint)  # 77 CLIP tokens, no T5 block
    assert torch.equal(cond.text[..., : out.hidden_states[-2].shape[-1]], out.hidden_states[-2])
    assert not cond.text[..., out.hidden_states[-2].shape[-1]:].any()  # zero-padded to the joint width
    assert torch.equal(cond.added["pooled"], out.text_embeds)
    assert backbone.describe()["clips"] == 1
    z = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(backbone.predict(z, 500.0, cond)).all()


def test_one_clip_layout_refuses_parts_that_do_not_fit():
    from transformers import CLIPTextConfig, CLIPTextModel

    parts = build_tiny_sd3(seed=0, with_t5=False)
    plain = CLIPTextModel(CLIPTextConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                         intermediate_size=37, vocab_size=514, projection_dim=32))
    with pytest.raises(ValueError, match=r"text_encoder: expected a CLIP text encoder with a projection .*CLIPTextModel"):
        _one_clip(parts, text_encoder=plain)
    with pytest.raises(ValueError, match="text_encoder_2: give the second CLIP together with its tokenizer"):
        SD3Backbone(parts["transformer"], parts["vae"], parts["text_encoder"], parts["tokenizer"],
                    parts["text_encoder_2"], None)
    with pytest.raises(ValueError, match="pooled channels; the transformer's pooled_projection_dim is 80"):
        SD3Backbone(parts["transformer"], parts["vae"], parts["text_encoder"], parts["tokenizer"], None, None)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two flow training steps on a tiny pool, resumed for a third, exported as a diffusers folder."""
    from dragondiff.train import shapes as train

    out = tmp_path_factory.mktemp("flow-train")
    small = dict(device=torch.device("cpu"), batch=2, pool_size=8, refresh_every=2, refresh_count=4)
    train.train_flow(out, steps=2, minutes=5, **small)
    train.train_flow(out, steps=3, minutes=5, **small)
    dest = out / "export"
    train.export_flow(out, dest)
    return out, dest


def test_flow_training_resumes_and_its_export_loads_and_edits(trained):
    out, dest = trained
    logs = sorted(out.glob("log-flow-*.json"))
    assert [json.loads(p.read_text())["resume_step"] for p in logs][-1] == 2
    assert torch.load(out / "flow.pt", weights_only=True)["step"] == 3
    index = json.loads((dest / "model_index.json").read_text())
    assert index["text_encoder_2"] == [None, None] and index["scheduler"][1] == "FlowMatchEulerDiscreteScheduler"
    assert sum(p.stat().st_size for p in dest.rglob("*") if p.is_file()) <= 20 * 2**20
    pipe = DragonPipeline.from_pretrained(dest, device="cpu", local_files_only=True)
    assert pipe.backbone.NAME == "SD3" and pipe.backbone.describe()["clips"] == 1
    assert pipe.backbone.feature_factor == 1  # patch size 1: a 16x16 token grid at 128 px
    img = np.zeros((128, 128, 3), np.uint8)
    img[40:70, 30:60] = (220, 30, 30)
    mask = np.zeros((128, 128), bool)
    mask[40:70, 30:60] = True
    result = pipe.edit(EditSpec(task="move", image=img, mask=mask, offset=(20, 10), prompt=CAPTION, preset="fast",
                                max_resolution=128, num_inference_steps=3), progress=False)
    assert np.asarray(result.image).shape == (128, 128, 3) and result.energies


def test_training_conditions_the_transformer_as_the_backbone_does(trained):
    from dragondiff.train.shapes import flow_condition

    pipe = DragonPipeline.from_pretrained(trained[1], device="cpu", local_files_only=True)
    backbone = pipe.backbone
    for prompt, cond in ((CAPTION, backbone.condition([CAPTION])), ("", backbone.unconditional())):
        ids = build_tokenizer()([prompt], padding="max_length", max_length=77, return_tensors="pt").input_ids
        with torch.no_grad():
            states, pooled = flow_condition(backbone.text_encoder, ids)
        assert torch.equal(cond.text, states.float()) and torch.equal(cond.added["pooled"], pooled.float())


def test_bundled_names_are_checked(monkeypatch, tmp_path):
    assert BUNDLED_FLOW_ID in BUNDLED_IDS
    with pytest.raises(ValueError, match=r"name: 'dragondiff:shape' is not a bundled model; bundled: "
                                         r"dragondiff:shapes, dragondiff:shapes-flow"):
        DragonPipeline.bundled("dragondiff:shape")
    monkeypatch.setattr(M, "FLOW_WEIGHTS", tmp_path / "none")
    with pytest.raises(ValueError, match="'dragondiff:shapes-flow' weights are not in this installation"):
        DragonPipeline.bundled(BUNDLED_FLOW_ID)


def _main(capsys, *args):
    from dragondiff.cli import main

    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_names_the_bundled_flow_model_and_refuses_it_when_its_weights_are_missing(monkeypatch, tmp_path,
                                                                                     capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = _main(capsys, "demo", "--model", "dragondiff:shape-flow")
    assert code == 2 and "'dragondiff:shape-flow' is not one of 'dragondiff:shapes', 'dragondiff:shapes-flow'" in err
    monkeypatch.setattr(M, "FLOW_WEIGHTS", tmp_path / "none")
    code, _, err = _main(capsys, "demo", "--model", BUNDLED_FLOW_ID)
    assert code == 2 and "--model dragondiff:shapes-flow: its weights are not in this installation" in err, err
    from PIL import Image

    Image.new("RGB", (64, 64), "red").save(tmp_path / "in.png")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (10, 10, 30, 30))
    mask.save(tmp_path / "m.png")
    code, _, err = _main(capsys, "move", "in.png", "--mask", "m.png", "--offset", "4,4", "--model", BUNDLED_FLOW_ID)
    assert code == 2 and "dragondiff:shapes-flow" in err and "not in this installation" in err, err
    assert not list(tmp_path.glob("dragondiff-demo*"))  # nothing written


def test_info_describes_the_bundled_flow_model_from_its_files(capsys):
    code, out, _ = _main(capsys, "info", "--model", BUNDLED_FLOW_ID, "--json")
    info = json.loads(out)["model"]
    assert code == 0 and info["available"] and info["backbone"] == "SD3" and info["prediction_type"] == "flow"
    assert info["default_max_resolution"] == 128 and info["path"] == str(M.FLOW_WEIGHTS)
    assert set(info["recommended_settings"]) == {"move", "drag", "appearance", "paste"}
