"""The backbone seam: one explicit forward for ε and the truncated feature pass, conditioning as data, the bank
processors installed through a slot, the backbone class picked from the model's configuration."""

import json

import pytest
import torch

from conftest import FAST
from dragondiff.attention import BankAttnProcessor, BankController, MemoryBank, install_bank_processors
from dragondiff.backbone import Conditioning, SD1Backbone
from dragondiff.loading import backbone_class


def test_explicit_forward_is_the_stock_unet(tiny_pipe):
    """ε equals the stock UNet2DConditionModel.forward bit for bit; the feature pass returns the stock forward's
    up_blocks[1] and [2] outputs and never runs the later blocks."""
    bb = tiny_pipe.backbone
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = bb.condition(["a red disc", ""])
    captured, later = {}, []
    hooks = [bb.unet.up_blocks[i].register_forward_hook(lambda m, a, out, i=i: captured.setdefault(i, out))
             for i in (1, 2)]
    with torch.no_grad():
        stock = bb.unet(z, 321, encoder_hidden_states=cond.text).sample
    for h in hooks:
        h.remove()
    with torch.no_grad():
        assert torch.equal(bb.predict(z, 321, cond), stock.float())
        hook = bb.unet.up_blocks[3].register_forward_hook(lambda *a: later.append(1))
        feats = bb.features(z, 321, cond)
        hook.remove()
    assert later == []
    assert [f.shape[-1] for f in feats] == [8, 16]
    for f, i in zip(feats, (1, 2)):
        assert torch.equal(f, captured[i])


def test_feature_pass_is_differentiable(tiny_pipe):
    bb = tiny_pipe.backbone
    z = torch.randn(1, 4, 16, 16, requires_grad=True)
    feats = bb.features(z, 500, bb.condition(["x"]))
    (g,) = torch.autograd.grad(sum(f.pow(2).mean() for f in feats), z)
    assert g.abs().sum() > 0


def test_conditioning_batches_and_slices_without_knowing_its_fields():
    a = Conditioning(torch.zeros(1, 3, 2), image_tokens=torch.zeros(1, 4, 2), added={"pooled": torch.zeros(1, 5)})
    b = Conditioning(torch.ones(1, 3, 2), image_tokens=torch.ones(1, 4, 2), added={"pooled": torch.ones(1, 5)})
    both = Conditioning.cat([a, b])
    assert both.batch == 2 and both.image_tokens.shape == (2, 4, 2) and both.added["pooled"].shape == (2, 5)
    assert torch.equal(both[1].text, b.text) and torch.equal(both[1].added["pooled"], b.added["pooled"])
    assert a.repeat(3).batch == 3 and a.repeat(3).image_tokens.shape[0] == 3
    with pytest.raises(ValueError, match="same kinds"):
        Conditioning.cat([a, Conditioning(torch.zeros(1, 3, 2))])


def test_sd1_backbone_refuses_image_tokens_it_cannot_read(tiny_pipe):
    bb = tiny_pipe.backbone
    cond = bb.condition(["x"])
    with pytest.raises(ValueError, match=r"image tokens given, but no image prompt \(IP-Adapter\) is loaded"):
        bb.predict(torch.zeros(1, 4, 8, 8), 10, Conditioning(cond.text, image_tokens=torch.zeros(1, 4, 32)))


def test_bank_processors_are_installed_once_and_read_the_edit_controller(tiny_pipe, scene):
    bb = tiny_pipe.backbone
    controller = BankController(MemoryBank(torch.device("cpu")))
    with bb.memory_bank(controller):
        procs = [p for n, p in bb.unet.attn_processors.items() if ".attn1." in n and n.startswith("up_blocks")]
        assert procs and all(isinstance(p, BankAttnProcessor) and p.slot.controller is controller for p in procs)
        assert install_bank_processors(bb.unet, bb._bank, bb.bank_layers) is None  # already there: nothing reinstalled
        inner = BankController(MemoryBank(torch.device("cpu")))
        with bb.memory_bank(inner):  # re-entrant (same thread): the inner controller rules inside
            assert all(p.slot.controller is inner for p in procs)
        assert all(p.slot.controller is controller for p in procs)  # and the outer one is back after it
    assert bb._bank.controller is None
    assert not any(isinstance(p, BankAttnProcessor) for p in bb.unet.attn_processors.values())


def test_backbone_class_from_the_configuration():
    assert backbone_class({"addition_embed_type": None, "in_channels": 4}) is SD1Backbone
    assert backbone_class({"in_channels": 4}, {"prediction_type": "v_prediction"}) is SD1Backbone
    with pytest.raises(ValueError, match=r"no backbone runs this model's layout.*'addition_embed_type': 'image'"):
        backbone_class({"addition_embed_type": "image", "in_channels": 4, "cross_attention_dim": 2048})
    with pytest.raises(ValueError, match=r"prediction type.*'prediction_type': 'sample'"):
        backbone_class({"in_channels": 4}, {"prediction_type": "sample"})


def test_components_pick_their_backbone(tiny_pipe):
    assert type(tiny_pipe.backbone) is SD1Backbone
    assert tiny_pipe.unet is tiny_pipe.backbone.unet  # read-only views of the backbone's parts


def test_settings_file_uses_the_edit_limits(tiny_pipe, tmp_path):
    """A recommended CFG the spec would refuse is refused when the model loads, naming the file."""
    from test_loading import _save_folder

    from dragondiff import DragonPipeline
    from dragondiff.loading import SETTINGS_FILE

    folder = _save_folder(tiny_pipe, tmp_path / "m")
    (folder / SETTINGS_FILE).write_text(json.dumps({"settings": {"move": {"guidance_scale": 60}}}))
    with pytest.raises(ValueError, match=rf"{SETTINGS_FILE}\[.move.\]\[.guidance_scale.\].*\[0, 50\]"):
        DragonPipeline.from_pretrained(folder, local_files_only=True, device="cpu")


def test_reconstruct_follows_the_preset(tiny_pipe, scene):
    img, _, _ = scene
    out = tiny_pipe.reconstruct(img, preset="fast", max_resolution=128, progress=False)
    assert out.pass_counts["cfg_unet"] == 20 and out.pass_counts["inversion_unet"] == 20


def test_text_to_image_goes_through_the_backbone(tiny_pipe):
    images = tiny_pipe.text_to_image(["a", "b"], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                                     size_hw=(64, 64))
    assert len(images) == 2 and images[0].shape == (64, 64, 3) and images[0].dtype.name == "uint8"
    with pytest.raises(ValueError, match="num_inference_steps"):
        tiny_pipe.text_to_image(["a"], num_inference_steps=0)


def test_on_step_hook_sees_every_step_and_can_stop(tiny_pipe, scene):
    """The user callback, intermediates and progress all go through the sampler's one per-step hook."""
    img, disc, _ = scene
    seen = []

    def callback(pipe, i, t, kw):
        seen.append(i)
        return {"interrupt": i == 1}

    out = tiny_pipe.move(img, disc, offset=(16, 0), callback_on_step_end=callback, return_intermediates=True,
                         **{**FAST, "num_inference_steps": 4})
    assert seen == [0, 1] and out.latents.shape[0] == 2
    assert any("interrupted after step 1" in f for f in out.flags)
