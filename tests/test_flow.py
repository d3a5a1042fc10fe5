"""Flow-matching transformers through the whole library: the flow-euler step rule against diffusers' scheduler, the
round trip, every task on SD3, SD3.5 and FLUX.1 layouts, guidance gradients, the CLI (edit, sidecar re-run, info),
the web UI session, and the refusals."""

import json

import numpy as np
import pytest
import torch

from conftest import FAST, make_scene
from dragondiff import DragonPipeline
from dragondiff.backbone_flux import FluxBackbone
from dragondiff.backbone_sd3 import SD3Backbone
from dragondiff.loading import backbone_class
from dragondiff.steps import FlowEulerRule
from dragondiff.tiny import FLOW_LAYOUTS, build_tiny_components, build_tiny_pipeline, save_tiny_model

CLASSES = {"sd3": SD3Backbone, "sd3.5": SD3Backbone, "flux": FluxBackbone}


@pytest.fixture(scope="module", params=FLOW_LAYOUTS)
def flow_pipe(request):
    return request.param, build_tiny_pipeline(0, request.param, device="cpu")


def test_each_flow_layout_picks_its_backbone_and_rule(flow_pipe):
    from dragondiff.compile import compiled_blocks

    layout, pipe = flow_pipe
    # what `enable_compile` compiles (SD3's transformer declares no repeated blocks: the backbone names them)
    blocks = compiled_blocks(pipe.denoiser, pipe.backbone.REPEATED_BLOCKS)
    assert len(blocks) == len(pipe.transformer.transformer_blocks) + len(
        getattr(pipe.transformer, "single_transformer_blocks", []))
    assert isinstance(pipe.backbone, CLASSES[layout]) and isinstance(pipe.rule, FlowEulerRule)
    assert pipe.denoiser is pipe.transformer is pipe.backbone.transformer and pipe.unet is None
    assert pipe.default_max_resolution == 1024 and pipe.backbone.latent_channels == 16
    assert pipe.backbone.describe()["prediction_type"] == "flow"
    # FLUX.1-dev embeds its guidance: true CFG is off by default (one conditional pass per step)
    assert (pipe.recommended_settings.get("move", {}).get("guidance_scale") == 1.0) == (layout == "flux")


@pytest.mark.parametrize("layout", ["sd3", "flux"])
def test_flow_schedule_and_unguided_step_are_diffusers(layout):
    """The σ and timesteps are those diffusers' SD3 / FLUX pipelines sample with (FLUX: σ from 1 to 1/n shifted by
    mu of the image's token count), and the unguided step is FlowMatchEulerDiscreteScheduler.step."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    pipe = build_tiny_pipeline(0, layout, device="cpu")
    latent_hw = (16, 24)
    schedule = pipe.schedule(8, latent_hw)
    scheduler = pipe.rule.scheduler()
    if layout == "flux":
        c = scheduler.config
        mu = calculate_shift(12 * 8, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 8, 8), mu=mu)
    else:
        scheduler.set_timesteps(8)
    assert schedule.timesteps == [float(t) for t in scheduler.timesteps]
    assert torch.equal(torch.stack(schedule.levels), scheduler.sigmas.float())
    assert schedule.levels[-1] == 0 and schedule.end_time == 0.0
    z = torch.randn(1, 16, *latent_hw, generator=torch.Generator().manual_seed(0))
    for i, t in enumerate(scheduler.timesteps):
        v = torch.randn(z.shape, generator=torch.Generator().manual_seed(i))
        ours = schedule.rule.step(z, v, schedule.levels[i], schedule.levels[i + 1])
        theirs = scheduler.step(v, t, z).prev_sample
        assert torch.allclose(ours, theirs, atol=1e-5), i
        z = theirs


def test_flow_rule_inverts_its_own_step_and_keeps_the_sde_inside_the_noise():
    rule = FlowEulerRule(build_tiny_components(0, "sd3")["scheduler"].config)
    s, s_next = torch.tensor(0.7), torch.tensor(0.4)
    z, v, v_hat = (torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(k)) for k in range(3))
    stepped = rule.step(z, v, s, s_next)
    assert torch.allclose(stepped, z + (s_next - s) * v, atol=1e-6)  # Euler
    assert torch.allclose(rule.invert(stepped, v, s_next, s), z, atol=1e-6)  # the same v back: where it started
    # guided x̂0, unguided direction: x̂0 moves by -σ·(v̂ - v), the noise part stays
    guided = rule.step(z, v_hat, s, s_next, pred_dir=v)
    assert torch.allclose(guided - stepped, -(1 - s_next) * s * (v_hat - v), atol=1e-6)
    sigma = rule.sde_sigma(1.0, s, s_next)
    assert 0 < sigma < s_next and rule.sde_sigma(0.0, s, s_next) == 0
    assert torch.allclose(rule.step(z, v, s, s_next, sigma=sigma * 0, noise=v_hat), stepped, atol=1e-6)


@pytest.mark.parametrize("case", ["move", "drag", "appearance", "paste", "face"])
def test_every_task_runs_on_each_flow_layout(flow_pipe, case):
    """Each task edits on each layout; its guidance gradients are finite and non-zero inside the region its
    energy reaches (the edit region M on the latent grid)."""
    from test_face import LANDMARKS, PHOTO, mouth_lowered
    from test_tasks import run

    _, pipe = flow_pipe
    if case == "face":
        out = pipe.reshape_face(PHOTO, landmarks=LANDMARKS, target_landmarks=mouth_lowered(LANDMARKS),
                                return_intermediates=True, **FAST)
    else:  # drag: a patch token is 16 px here (8 cells, the border ones clipped): the handle moves two cells
        extra = {"points": [((96, 88), (64, 88))]} if case == "drag" else {}
        out = run(pipe, case, num_inference_steps=4, return_intermediates=True, **extra)
    assert out.image.size == (128, 128) and all(np.isfinite(e[2]) for e in out.energies if e[2] is not None)
    assert out.pass_counts["feature_grad"] >= 1 and out.pass_counts["backward"] >= 1
    gradients = [g for _, _, g in out.guidance]
    assert gradients and all(torch.isfinite(g).all() for g in gradients)
    assert any(g.abs().sum() > 0 for g in gradients)


@pytest.mark.parametrize("layout", FLOW_LAYOUTS)
def test_flow_round_trips_reconstruct_and_converge_with_steps(layout):
    """Euler inversion + unguided sampling gives back z0, without the bank and with it (the memory bank replacing
    the image tokens' K/V at every step: the zero-energy edit of the sampler), and the error falls with more steps
    (Euler's first-order error). Measured: below 1e-4 with the smoothed tiny models at 20 steps."""
    from test_backbones import smooth

    pipe = smooth(build_tiny_pipeline(0, layout, device="cpu"))
    img, _, _ = make_scene()

    def error(out):
        z0, final = out.inverted_latents[0], out.latents[-1]
        return ((final - z0).pow(2).mean().sqrt() / z0.pow(2).mean().sqrt()).item()

    errors = {}
    for use_bank in (False, True):
        for steps in (5, 20):
            out = pipe.reconstruct(img, prompt="a scene", use_bank=use_bank, max_resolution=128,
                                   num_inference_steps=steps, return_intermediates=True, progress=False)
            errors[use_bank, steps] = error(out)
    assert max(errors.values()) < 0.05, errors
    assert errors[False, 20] < errors[False, 5], errors


def test_flux_true_cfg_is_one_pass_at_guidance_1_and_two_above():
    pipe = build_tiny_pipeline(0, "flux", device="cpu")
    img, disc, _ = make_scene()
    calls = []
    original = pipe.backbone.predict
    pipe.backbone.predict = lambda z, t, cond: calls.append(z.shape[0]) or original(z, t, cond)
    try:
        for scale in (1.0, 3.0):
            calls.clear()
            pipe.move(img, disc, offset=(16, 0), guidance_scale=scale, energy_scale=0.0, preset="paper", **FAST)
            sampling = calls[FAST["num_inference_steps"]:]  # after the inversion's passes
            assert set(sampling) == ({1} if scale == 1.0 else {2}), (scale, calls)
    finally:
        del pipe.backbone.predict


@pytest.mark.parametrize("layout", ["sd3", "flux"])
def test_flow_folders_load_and_the_cli_edits_reruns_and_names_them(layout, tmp_path, capsys):
    """A tiny SD3 / FLUX saved as a diffusers folder loads by path with the same weights; the CLI edits with it,
    `info` names the backbone, and `run` of the sidecar gives the same image."""
    from PIL import Image

    from dragondiff.cli import main

    folder = save_tiny_model(tmp_path / layout, layout)
    loaded = DragonPipeline.from_pretrained(folder, local_files_only=True, device="cpu")
    reference = build_tiny_pipeline(0, layout, device="cpu")
    a, b = loaded.transformer.state_dict(), reference.transformer.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert main(["info", "--json", "--model", str(folder)]) == 0
    info = json.loads(capsys.readouterr().out)["model"]
    assert (info["backbone"], info["prediction_type"], info["default_max_resolution"]) == (
        CLASSES[layout].NAME, "flow", 1024)

    img, disc, _ = make_scene()
    Image.fromarray(img).save(tmp_path / "scene.png")
    Image.fromarray(disc.astype(np.uint8) * 255).save(tmp_path / "disc.png")
    code = main(["move", str(tmp_path / "scene.png"), "--mask", str(tmp_path / "disc.png"), "--offset", "16,0",
                 "--model", str(folder), "--steps", "3", "--max-resolution", "128", "--threads", "1", "-q",
                 "-o", str(tmp_path / "moved.png")])
    assert code == 0, capsys.readouterr().err
    side = json.loads((tmp_path / "moved.json").read_text())
    assert side["backbone"]["name"] == CLASSES[layout].NAME and side["backbone"]["prediction_type"] == "flow"
    assert main(["run", str(tmp_path / "moved.json"), "-q", "--threads", "1", "-o", str(tmp_path / "again.png")]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "moved.png")),
                          np.asarray(Image.open(tmp_path / "again.png")))


def test_the_web_ui_session_edits_with_flux(tmp_path):
    """The UI's edit path takes a FLUX pipeline unchanged: the inversion is reused and the sidecar names FLUX."""
    from test_backbones import ui_session_edits_twice

    assert ui_session_edits_twice(build_tiny_pipeline(0, "flux", device="cpu"), tmp_path) == "FLUX.1"


def test_flow_refusals_name_what_was_found(tmp_path):
    """Timestep-distilled FLUX (schnell-type), an unknown transformer, a flow model with a DDIM scheduler, and what
    the flow families do not take yet (IP-Adapter, LoRA) are refused by name, before any sampling."""
    from dragondiff.tiny_flux import build_tiny_flux

    with pytest.raises(ValueError, match="timestep-distilled.*schnell"):
        DragonPipeline(**build_tiny_flux(0, guidance_embeds=False), device="cpu")
    with pytest.raises(ValueError, match="timestep-distilled"):  # from the configuration alone (CLI pre-checks)
        backbone_class({"_class_name": "FluxTransformer2DModel", "guidance_embeds": False})
    with pytest.raises(ValueError, match="PixArtTransformer2DModel|PixArt"):
        backbone_class({"_class_name": "PixArtTransformer2DModel", "patch_size": 2})
    parts = build_tiny_components(0, "sd3")
    ddim = build_tiny_components(0, "sd1")["scheduler"]
    with pytest.raises(ValueError, match="scheduler: a SD3 model is sampled with flow matching.*its scheduler is DDIMScheduler"):
        DragonPipeline(**{**parts, "scheduler": ddim}, device="cpu")
    folder = save_tiny_model(tmp_path / "pixart", "sd3")
    index = folder / "model_index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()),
                                 "transformer": ["diffusers", "PixArtTransformer2DModel"]}))
    with pytest.raises(ValueError, match="a PixArt model"):
        DragonPipeline.from_pretrained(folder, local_files_only=True, device="cpu")
    pipe = build_tiny_pipeline(0, "sd3", device="cpu")
    with pytest.raises(ValueError, match="no IP-Adapter support on SD3"):
        pipe.backbone.load_image_prompt(object())
    with pytest.raises(ValueError, match="LoRA.*SD3"):
        pipe.load_lora_weights({"transformer.x.lora_A.weight": torch.zeros(1, 1)})


def _drop_transformer_keys(folder):
    from safetensors.torch import load_file, save_file

    path = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(path))
    save_file({k: v for k, v in state.items() if not k.startswith("transformer_blocks.0.")}, str(path))


@pytest.mark.parametrize("layout, breaks, message", [
    ("sd3", _drop_transformer_keys, r"transformer: its weights do not match its configuration: \d+ missing "
                                    r"\(transformer_blocks\.0\."),
    ("flux", _drop_transformer_keys, r"transformer: its weights do not match its configuration"),
    ("flux", lambda f: __import__("shutil").rmtree(f / "text_encoder_2"), r"has no text_encoder_2/ folder"),
    ("sd3", lambda f: (f / "transformer" / "config.json").unlink(), r"transformer/config\.json is missing in "),
], ids=["sd3-missing-keys", "flux-missing-keys", "flux-no-t5", "sd3-no-config"])
def test_broken_flow_folders_are_refused_by_component(tmp_path, layout, breaks, message):
    """Missing weights are never filled at random: refused at load, naming the component and its keys or file."""
    folder = save_tiny_model(tmp_path / layout, layout)
    breaks(folder)
    with pytest.raises(ValueError, match=message):
        DragonPipeline.from_pretrained(folder, local_files_only=True, device="cpu")


def test_a_sidecars_dtype_is_checked_as_the_option_is(tmp_path, capsys):
    """`run` takes a sidecar's dtype as if given with --dtype: an unknown one is refused (exit 2) before loading."""
    from PIL import Image

    from conftest import TINY_MODEL
    from dragondiff.cli import main

    img, disc, _ = make_scene()
    Image.fromarray(img).save(tmp_path / "scene.png")
    Image.fromarray(disc.astype(np.uint8) * 255).save(tmp_path / "disc.png")
    assert main(["move", str(tmp_path / "scene.png"), "--mask", str(tmp_path / "disc.png"), "--offset", "16,0",
                 "--model", str(TINY_MODEL), "--steps", "2", "--max-resolution", "128", "--threads", "1", "-q",
                 "-o", str(tmp_path / "moved.png")]) == 0
    side = json.loads((tmp_path / "moved.json").read_text())
    assert side["dtype"] == "float32"
    (tmp_path / "bad.json").write_text(json.dumps({**side, "dtype": "int8"}))
    capsys.readouterr()
    assert main(["run", str(tmp_path / "bad.json"), "-q", "-o", str(tmp_path / "again.png")]) == 2
    assert "--dtype: 'int8' is not supported" in capsys.readouterr().err
    assert not (tmp_path / "again.png").exists()
