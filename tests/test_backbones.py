"""SD2.x (ε and v-prediction) and SDXL through the backbone seam, on tiny random models of each layout: the v -> ε
conversion against diffusers' scheduler, SDXL's conditioning against diffusers' SDXL pipeline, every task, the
round trips, loading from diffusers folders, refusals, `info` and sidecars."""

import json

import numpy as np
import pytest
import torch

from conftest import FAST, make_scene
from dragondiff import DragonPipeline
from dragondiff.backbone import SD2Backbone
from dragondiff.backbone_sdxl import SDXLBackbone
from dragondiff.loading import backbone_class
from dragondiff.tiny import build_tiny_components, build_tiny_pipeline, save_tiny_model

LAYOUTS = ("sd2", "sd2-v", "sdxl")
NAMES = {"sd2": ("SD2.x", "epsilon"), "sd2-v": ("SD2.x", "v_prediction"), "sdxl": ("SDXL", "epsilon")}


@pytest.fixture(scope="module", params=LAYOUTS)
def layout_pipe(request):
    return request.param, build_tiny_pipeline(0, request.param, device="cpu")


@pytest.fixture(scope="module")
def v_pipe():
    return build_tiny_pipeline(0, "sd2-v", device="cpu")


@pytest.fixture(scope="module")
def xl_pipe():
    return build_tiny_pipeline(0, "sdxl", device="cpu")


def test_each_layout_picks_its_backbone(layout_pipe):
    layout, pipe = layout_pipe
    name, prediction = NAMES[layout]
    assert (pipe.backbone.NAME, pipe.backbone.prediction_type) == (name, prediction)
    assert pipe.default_max_resolution == (1024 if layout == "sdxl" else 768)


def test_v_prediction_conversions_agree_with_diffusers(v_pipe):
    """The backbone's ε from a v prediction gives the x0 and the DDIM step diffusers' DDIMScheduler computes from
    the raw v (prediction_type v_prediction), to float precision; a v model never runs as if it predicted ε."""
    from diffusers import DDIMScheduler

    bb = v_pipe.backbone
    scheduler = DDIMScheduler.from_config(v_pipe.scheduler_config)
    assert scheduler.config.prediction_type == "v_prediction"
    scheduler.set_timesteps(10)
    schedule = v_pipe.schedule(10)
    assert schedule.timesteps == [int(t) for t in scheduler.timesteps]
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = bb.condition(["a red disc"])
    with torch.no_grad():
        for i in (0, 3, 9):
            t = schedule.timesteps[i]
            v, eps = bb.forward(z, t, cond), bb.predict(z, t, cond)
            assert not torch.allclose(v, eps, atol=1e-3)
            ref = scheduler.step(v, t, z)
            a_t, a_prev, rule = schedule.levels[i], schedule.levels[i + 1], schedule.rule
            assert torch.allclose(rule.x0(z, eps, a_t), ref.pred_original_sample, atol=2e-5, rtol=1e-5)
            assert torch.allclose(rule.step(z, eps, a_t, a_prev), ref.prev_sample, atol=2e-5, rtol=1e-5)


def test_sdxl_conditioning_is_diffusers(xl_pipe):
    """Token features, pooled embedding, zero negative branch and time ids as diffusers' SDXL pipeline makes them;
    the explicit forward equals the stock UNet with those added conditions."""
    from diffusers import StableDiffusionXLPipeline

    bb = xl_pipe.backbone
    ref = StableDiffusionXLPipeline(vae=bb.vae, text_encoder=bb.text_encoder, text_encoder_2=bb.text_encoder_2,
                                    tokenizer=bb.tokenizer, tokenizer_2=bb.tokenizer_2, unet=bb.unet,
                                    scheduler=build_tiny_components(0, "sdxl")["scheduler"])
    embeds, neg, pooled, neg_pooled = ref.encode_prompt("a red disc", device="cpu", do_classifier_free_guidance=True)
    cond, uncond = bb.condition(["a red disc"], (96, 128)), bb.unconditional((96, 128))
    assert torch.equal(cond.text, embeds) and torch.equal(cond.added["text_embeds"], pooled)
    assert torch.equal(uncond.text, neg) and torch.equal(uncond.added["text_embeds"], neg_pooled)
    time_ids = ref._get_add_time_ids((96, 128), (0, 0), (96, 128), dtype=torch.float32,
                                     text_encoder_projection_dim=bb.text_encoder_2.config.projection_dim)
    assert torch.equal(cond.added["time_ids"], time_ids) and torch.equal(uncond.added["time_ids"], time_ids)
    z = torch.randn(2, 4, 12, 16, generator=torch.Generator().manual_seed(0))
    both = type(cond).cat([uncond, cond])
    with torch.no_grad():
        stock = bb.unet(z, 321, encoder_hidden_states=both.text, added_cond_kwargs=both.added).sample
        assert torch.equal(bb.predict(z, 321, both), stock)
        feats = bb.features(z, 321, both)
    assert [tuple(f.shape[-2:]) for f in feats] == [(6, 8), (12, 16)]  # 1/2 and 1/1 of the latent, as SD1's
    with pytest.raises(ValueError, match="size_hw: SDXL's conditioning needs the working size"):
        bb.condition(["x"])


def test_sdxl_edit_conditions_on_the_working_size_and_banks_its_half_resolution_layers(xl_pipe):
    bb = xl_pipe.backbone
    img, disc, _ = make_scene()
    wide = np.concatenate([img, img], axis=1)  # 128 x 256 -> working size 64 x 192
    sizes = []
    original = bb.condition
    bb.condition = lambda prompts, size_hw=None: sizes.append(size_hw) or original(prompts, size_hw)
    try:
        inv = xl_pipe.invert(wide, prompt="shapes", max_resolution=128, num_inference_steps=2, progress=False)
    finally:
        del bb.condition
    assert sizes == [(64, 192)] and inv.size_hw == (64, 192)
    layers = inv.bank.layers()
    assert len(layers) == 6 and all(n.startswith("up_blocks.1.") for n in layers)  # SDXL's 6 at 1/2 resolution
    latent_hw = tuple(d // 8 for d in inv.size_hw)
    assert inv.bank.nbytes == bb.bank_bytes(latent_hw, 2)


def test_sdxl_vae_runs_in_float32_when_the_model_is_float16():
    pipe = build_tiny_pipeline(0, "sdxl", device="cpu")
    pipe.to(dtype=torch.float16)
    assert pipe.unet.dtype == torch.float16 and pipe.text_encoder_2.dtype == torch.float16
    assert pipe.vae.dtype == torch.float32 and pipe.backbone.describe()["vae_dtype"] == "float32"
    pipe.to(dtype=torch.bfloat16)  # bf16 does not overflow: the VAE follows
    assert pipe.vae.dtype == torch.bfloat16


@pytest.mark.parametrize("case", ["move", "drag", "appearance", "paste", "face"])
def test_every_task_runs_on_each_layout(layout_pipe, case):
    from test_face import LANDMARKS, PHOTO, mouth_lowered
    from test_tasks import run

    _, pipe = layout_pipe
    if case == "face":
        out = pipe.reshape_face(PHOTO, landmarks=LANDMARKS, target_landmarks=mouth_lowered(LANDMARKS), **FAST)
    else:
        out = run(pipe, case, num_inference_steps=2)
    assert out.image.size == (128, 128) and all(np.isfinite(e[2]) for e in out.energies if e[2] is not None)
    assert out.pass_counts["feature_grad"] >= 1 and out.pass_counts["backward"] >= 1


def smooth(pipe):
    """A prediction (ε or v) that varies slowly with z and t (the network's output layer scaled down: a UNet's
    conv_out, a transformer's proj_out), so inversion is nearly exact (see test_bank.test_reconstruction_with_bank)."""
    out = getattr(pipe.denoiser, "conv_out", None) or pipe.denoiser.proj_out
    with torch.no_grad():
        out.weight.mul_(0.02)
        out.bias.mul_(0.02)
    return pipe


@pytest.mark.parametrize("layout", LAYOUTS)
def test_round_trips_reconstruct(layout):
    """Inversion + unguided sampling gives back z0, without the bank and with it (the no-guidance edit reproducing
    the input's round trip). 20 steps: the relative error measured 0.056 (SD2), 0.088 (SDXL), below 0.05 (SD2-v), falling
    with more steps (0.049 and 0.071 at 25); a wrong ᾱ index or bank step gives errors of order 1."""
    pipe = smooth(build_tiny_pipeline(0, layout, device="cpu"))
    img, _, _ = make_scene()
    errors = {}
    for use_bank in (False, True):
        out = pipe.reconstruct(img, prompt="a scene", use_bank=use_bank, max_resolution=128, num_inference_steps=20,
                               return_intermediates=True, progress=False)
        z0, final = out.inverted_latents[0], out.latents[-1]
        errors[use_bank] = ((final - z0).pow(2).mean().sqrt() / z0.pow(2).mean().sqrt()).item()
    assert max(errors.values()) < 0.12, errors


def test_refused_at_load_naming_what_was_found(tmp_path):
    with pytest.raises(ValueError, match=r"prediction type \(found .*'prediction_type': 'sample'"):
        backbone_class({"in_channels": 4, "use_linear_projection": True}, {"prediction_type": "sample"})
    with pytest.raises(ValueError, match=r"layout \(found .*'in_channels': 9"):
        backbone_class({"in_channels": 9})  # an inpainting UNet
    with pytest.raises(ValueError, match=r"layout \(found .*'class_embed_type': 'projection'"):
        backbone_class({"in_channels": 4, "class_embed_type": "projection"})  # unCLIP
    parts = build_tiny_components(0, "sdxl")
    with pytest.raises(ValueError, match="text_encoder_2: an SDXL model needs both text encoders"):
        DragonPipeline(**{**parts, "text_encoder_2": None})
    with pytest.raises(TypeError, match="text_encoder_2/tokenizer_2: an SD2.x model has one text encoder"):
        DragonPipeline(**{**build_tiny_components(0, "sd2"), "text_encoder_2": parts["text_encoder_2"]})
    folder = save_tiny_model(tmp_path / "sample", "sd2")
    config = folder / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "prediction_type": "sample"}))
    with pytest.raises(ValueError, match=r"^model: no backbone runs this model's prediction type.*'sample'"):
        DragonPipeline.from_pretrained(folder, local_files_only=True, device="cpu")


@pytest.mark.parametrize("layout", ["sd2-v", "sdxl"])
def test_single_files_load_with_their_config(layout, tmp_path):
    """An original-layout checkpoint (SD2: OpenCLIP text under cond_stage_model.model.; SDXL: CLIP + OpenCLIP
    bigG under conditioner.embedders.0/1) with --config naming a folder of its family loads to the same weights,
    backbone and prediction type."""
    from ldm_export import export_ldm_checkpoint

    folder = save_tiny_model(tmp_path / layout, layout)
    bb = build_tiny_pipeline(0, layout, device="cpu").backbone
    path = tmp_path / f"{layout}.safetensors"
    export_ldm_checkpoint(bb.unet, bb.vae, bb.text_encoder, path, text_encoder_2=getattr(bb, "text_encoder_2", None),
                          open_clip=layout != "sdxl")
    single = DragonPipeline.from_single_file(path, config=folder, local_files_only=True, device="cpu")
    assert (single.backbone.NAME, single.backbone.prediction_type) == NAMES[layout]
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if getattr(bb, name, None) is not None:
            a, b = getattr(bb, name).state_dict(), getattr(single.backbone, name).state_dict()
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_folders_load_and_the_cli_names_the_backbone(tmp_path, capsys):
    """A tiny SDXL and SD2.1-v saved as diffusers folders load by path (same weights), and the CLI takes them
    unchanged: `info` and the sidecar say which backbone ran."""
    from dragondiff.cli import main

    v_folder = save_tiny_model(tmp_path / "sd21v", "sd2-v")
    loaded = DragonPipeline.from_pretrained(v_folder, local_files_only=True, device="cpu")
    assert isinstance(loaded.backbone, SD2Backbone) and loaded.backbone.prediction_type == "v_prediction"
    assert main(["info", "--json", "--model", str(v_folder)]) == 0
    info = json.loads(capsys.readouterr().out)["model"]
    assert (info["backbone"], info["prediction_type"], info["default_max_resolution"]) == ("SD2.x", "v_prediction",
                                                                                           768)
    xl_folder = save_tiny_model(tmp_path / "sdxl", "sdxl")
    xl = DragonPipeline.from_pretrained(xl_folder, local_files_only=True, device="cpu")
    assert isinstance(xl.backbone, SDXLBackbone) and xl.backbone.force_zeros_for_empty_prompt
    reference = build_tiny_pipeline(0, "sdxl", device="cpu")
    for name in ("unet", "text_encoder", "text_encoder_2", "vae"):
        a, b = getattr(xl.backbone, name).state_dict(), getattr(reference.backbone, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert main(["info", "--json", "--model", str(xl_folder)]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["default_max_resolution"] == 1024

    from PIL import Image

    img, disc, _ = make_scene()
    Image.fromarray(img).save(tmp_path / "scene.png")
    Image.fromarray(disc.astype(np.uint8) * 255).save(tmp_path / "disc.png")
    code = main(["move", str(tmp_path / "scene.png"), "--mask", str(tmp_path / "disc.png"), "--offset", "16,0",
                 "--model", str(xl_folder), "--steps", "2", "--max-resolution", "128", "--threads", "1", "-q",
                 "-o", str(tmp_path / "moved.png")])
    assert code == 0, capsys.readouterr().err
    side = json.loads((tmp_path / "moved.json").read_text())
    assert side["backbone"] == {"name": "SDXL", "prediction_type": "epsilon", "vae_dtype": "float32"}
    assert Image.open(tmp_path / "moved.png").size == (128, 128)



def ui_session_edits_twice(pipe, tmp_path) -> str:
    """Two moves through the UI's edit path: the second reuses the inversion and gives the same image. Returns the
    backbone name the sidecar records."""
    from dragondiff.ui import session as S

    img, disc, _ = make_scene()
    session = S.Session()
    where = {"outputs": S.Outputs(parent=tmp_path), "owner": "page-1"}
    opts = {"num_inference_steps": 2, "max_resolution": 128, "preset": "official", "seed": 1}
    out1, st1, files = S.run_edit(pipe, session, "move", img, mask=disc, points=[(36, 44), (60, 50)],
                                  prompt="p", options=dict(opts), **where)
    out2, st2, _ = S.run_edit(pipe, session, "move", img, mask=disc, points=[(36, 44), (60, 50)],
                              prompt="p", options=dict(opts), **where)
    assert (st1["inversion"], st2["inversion"]) == ("computed", "reused")
    assert np.array_equal(np.asarray(out1), np.asarray(out2))
    return json.loads(files[1].read_text())["backbone"]["name"]


def test_the_web_ui_session_edits_with_sdxl(xl_pipe, tmp_path):
    """The UI's edit path takes an SDXL pipeline unchanged: the inversion is reused and the sidecar names SDXL."""
    assert ui_session_edits_twice(xl_pipe, tmp_path) == "SDXL"
