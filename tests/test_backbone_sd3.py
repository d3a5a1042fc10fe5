"""The SD3 / SD3.5 backbone on tiny random models built in code: diffusers' own StableDiffusion3Pipeline is the
reference for conditioning and prediction; the truncated feature pass, the memory bank on the joint attention's
image tokens, loading from a saved folder and the refusals."""

import pytest
import torch

from dragondiff.attention import CAPTURE, CONCAT, REPLACE, UNION, BankController, MemoryBank
from dragondiff.backbone import Conditioning
from dragondiff.backbone_sd3 import SD3Backbone, SD3BankProcessor, blocks_for_depth, drop_massive_channels
from dragondiff.tiny_sd3 import build_tiny_sd3, save_tiny_sd3

PROMPT = "a red disc on grass"


def _pipeline(parts):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(**parts)


def _backbone(parts, **kwargs):
    names = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3",
             "tokenizer_3")
    return SD3Backbone(*(parts[n] for n in names), **kwargs)


@pytest.fixture(scope="module")
def models():
    """(pipeline, backbone) over the same component objects, per (layout, with_t5)."""
    cache = {}

    def get(layout="sd3", with_t5=True):
        if (layout, with_t5) not in cache:
            parts = build_tiny_sd3(seed=0, layout=layout, with_t5=with_t5)
            cache[layout, with_t5] = (_pipeline(parts), _backbone(parts))
        return cache[layout, with_t5]

    return get


def _latent(batch=2, size=16, seed=0):
    return torch.randn(batch, 16, size, size, generator=torch.Generator().manual_seed(seed))


def _timestep(pipe, index=1, steps=4):
    pipe.scheduler.set_timesteps(steps)
    return pipe.scheduler.timesteps[index]


# --------------------------------------------------------------------------------------- the tiny models


@pytest.mark.parametrize("layout,with_t5", [("sd3", True), ("sd3.5", False)])
def test_stock_pipeline_runs_two_steps_on_the_tiny_components(layout, with_t5):
    parts = build_tiny_sd3(seed=0, layout=layout, with_t5=with_t5)
    tr = parts["transformer"]
    assert (tr.config.patch_size, tr.config.in_channels, parts["vae"].config.latent_channels) == (2, 16, 16)
    assert (parts["vae"].config.shift_factor, parts["vae"].config.scaling_factor) == (0.0609, 1.5305)
    assert parts["scheduler"].config.shift == 3.0
    dual = [i for i, b in enumerate(tr.transformer_blocks) if b.attn2 is not None]
    assert dual == ([0, 1] if layout == "sd3.5" else [])
    assert (tr.transformer_blocks[0].attn.norm_q is not None) == (layout == "sd3.5")
    assert (parts["text_encoder_3"] is not None) == with_t5
    out = _pipeline(parts)(PROMPT, num_inference_steps=2, height=64, width=64, output_type="np",
                           generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 64, 64, 3)
    assert torch.isfinite(torch.from_numpy(out.images)).all()


def test_tiny_builder_refuses_unknown_layouts():
    with pytest.raises(ValueError, match="layout: expected one of sd3, sd3.5"):
        build_tiny_sd3(layout="sd3-large")
    with pytest.raises(TypeError, match="with_t5"):
        build_tiny_sd3(with_t5="yes")


def test_layer_choices_follow_the_depth():
    assert blocks_for_depth(24) == ((11, 17), tuple(range(12, 24)))  # SD3.5-Medium / SD3-Medium
    assert blocks_for_depth(4) == ((1, 2), (2, 3))  # the tiny models
    assert blocks_for_depth(1) == ((0,), (0,))
    with pytest.raises(ValueError, match="transformer"):
        blocks_for_depth(0)


# ------------------------------------------------------------------------------ conditioning and predict


@pytest.mark.parametrize("with_t5", [True, False])
def test_condition_is_the_pipelines_encode_prompt(models, with_t5):
    pipe, bb = models("sd3", with_t5)
    with torch.no_grad():  # as the pipeline's __call__ runs it (T5's kernels differ by ~1e-5 with autograd on)
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            [PROMPT, "blue"], None, None, do_classifier_free_guidance=True, device=torch.device("cpu"))
    cond, uncond = bb.condition([PROMPT, "blue"]), bb.unconditional(n=2)
    assert cond.text.shape == (2, 77 + 256, 96) and cond.added["pooled"].shape == (2, 80)
    assert torch.equal(cond.text, embeds.float()) and torch.equal(cond.added["pooled"], pooled.float())
    assert torch.equal(uncond.text, negative.float())
    assert torch.equal(uncond.added["pooled"], negative_pooled.float())
    t5_part = cond.text[:, 77:]
    assert (t5_part.abs().sum() == 0) == (not with_t5)  # no T5: zeros, as diffusers does
    assert cond.text[:, :77, 80:].abs().sum() == 0  # the CLIP states are zero-padded to the joint width


@pytest.mark.parametrize("layout", ["sd3", "sd3.5"])
def test_predict_is_the_stock_transformer_as_the_pipeline_calls_it(models, layout):
    pipe, bb = models(layout, True)
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(PROMPT, None, None, device=torch.device("cpu"))
    z, t = _latent(), _timestep(pipe)
    cond = Conditioning.cat([bb.unconditional(), bb.condition([PROMPT])])
    with torch.no_grad():
        stock = pipe.transformer(hidden_states=z, timestep=t.expand(2),
                                 encoder_hidden_states=torch.cat([negative, embeds]),
                                 pooled_projections=torch.cat([negative_pooled, pooled]), return_dict=False)[0]
        v, v_float = bb.predict(z, t, cond), bb.predict(z, float(t), cond)
    assert v.dtype == torch.float32 and v.shape == z.shape
    torch.testing.assert_close(v, stock.float(), rtol=1e-6, atol=1e-6)
    assert torch.equal(v, v_float)


# ------------------------------------------------------------------------------------------- features


@pytest.mark.parametrize("layout", ["sd3", "sd3.5"])
def test_raw_features_are_the_image_tokens_and_stop_early(models, layout):
    _, bb = models(layout, True)
    bb.feature_norm = "raw"
    try:
        z, cond = _latent(), bb.condition([PROMPT, ""])
        blocks = bb.transformer.transformer_blocks
        captured, later = {}, []
        hooks = [blocks[i].register_forward_hook(lambda m, a, out, i=i: captured.update({i: out[1]}))
                 for i in bb.feature_blocks]  # (a hook returning a value would replace the block's output)
        with torch.no_grad():
            bb.predict(z, 500.0, cond)
        for h in hooks:
            h.remove()
        hook = blocks[bb.max_feature_block + 1].register_forward_hook(lambda *a: later.append(1))
        with torch.no_grad():
            feats = bb.features(z, 500.0, cond)
        hook.remove()
    finally:
        bb.feature_norm = "dit"
    assert later == []
    assert bb.feature_blocks == (1, 2) and bb.feature_factor == 0.5
    for f, i in zip(feats, bb.feature_blocks):
        assert f.shape == (2, 32, 8, 8)  # inner width on the 16 / patch 2 grid
        assert torch.equal(f.flatten(2).transpose(1, 2), captured[i])


def test_dit_features_are_normalised_and_differentiable(models):
    _, bb = models("sd3.5", False)
    z = _latent(batch=1).requires_grad_(True)
    cond = bb.condition([PROMPT])
    feats = bb.features(z, 700.0, cond)
    assert [f.shape for f in feats] == [(1, 32, 8, 8)] * 2
    raw = bb.forward(z.detach(), 700.0, cond, stop_after=1)[0][1]
    assert not torch.allclose(feats[0].flatten(2).transpose(1, 2), raw)
    sum(f.square().mean() for f in feats).backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    z.grad = None
    bb.feature_norm = "raw"
    try:
        bb.features(z, 700.0, cond)[1].square().mean().backward()
    finally:
        bb.feature_norm = "dit"
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_gradient_checkpointing_gives_the_same_features_and_gradient():
    parts = build_tiny_sd3(seed=0, layout="sd3.5", with_t5=False)
    bb = _backbone(parts)
    z0, cond = _latent(batch=1), bb.condition([PROMPT])
    grads, feats, calls = [], [], []
    for checkpointing in (False, True):
        if checkpointing:
            tr = bb.transformer
            tr.enable_gradient_checkpointing()
            original = tr._gradient_checkpointing_func
            tr._gradient_checkpointing_func = lambda *a, **k: (calls.append(1), original(*a, **k))[1]
        z = z0.clone().requires_grad_(True)
        out = bb.features(z, 400.0, cond)
        sum(f.square().mean() for f in out).backward()
        grads.append(z.grad)
        feats.append([f.detach() for f in out])
    assert len(calls) == bb.max_feature_block + 1  # every block run went through the checkpoint
    torch.testing.assert_close(grads[1], grads[0])
    for a, b in zip(*feats):
        torch.testing.assert_close(a, b)


def test_massive_channels_are_zeroed():
    raw = torch.randn(2, 64, 32, generator=torch.Generator().manual_seed(0))
    raw[..., 5] *= 500.0
    normed = torch.ones(2, 64, 32)
    out = drop_massive_channels(normed, raw)
    assert (out[..., 5] == 0).all()
    assert (out[..., [c for c in range(32) if c != 5]] == 1).all()
    assert torch.equal(drop_massive_channels(normed, torch.randn(2, 64, 32)), normed)  # nothing massive: unchanged


def test_feature_norm_is_checked(models):
    _, bb = models("sd3", True)
    with pytest.raises(ValueError, match="feature_norm: expected one of raw, dit"):
        bb.feature_norm = "l2"


# ------------------------------------------------------------------------------------------ memory bank


@pytest.mark.parametrize("layout", ["sd3", "sd3.5"])
def test_bank_capture_then_replace_reproduces_the_plain_prediction(models, layout):
    _, bb = models(layout, False)
    z, cond = _latent(batch=1), bb.condition([PROMPT])
    before = dict(bb.transformer.attn_processors)
    with torch.no_grad():
        plain = bb.predict(z, 600.0, cond)
        controller = BankController(MemoryBank(torch.device("cpu")))
        with bb.memory_bank(controller):
            assert all(isinstance(bb.transformer.attn_processors[n], SD3BankProcessor)
                       for n in bb.bank_layer_names())
            with controller.use(CAPTURE, 3):
                captured = bb.predict(z, 600.0, cond)
            with controller.use(REPLACE, 3):
                replaced = bb.predict(z, 600.0, cond)
            with controller.use(CONCAT, 3):
                concat = bb.predict(z, 600.0, cond)
    assert bb.bank_blocks == (2, 3)
    assert controller.bank.layers() == ["transformer_blocks.2.attn", "transformer_blocks.3.attn"]
    k, v = controller.bank.get("transformer_blocks.2.attn", 3, torch.device("cpu"))
    assert k.shape == v.shape == (1, 64, 32)  # image tokens only: (16 / 2)^2
    torch.testing.assert_close(captured, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(replaced, plain, rtol=1e-5, atol=1e-5)
    assert (concat - plain).abs().max() > 1e-4
    after = bb.transformer.attn_processors
    assert before.keys() == after.keys() and all(after[n] is before[n] for n in before)


def test_bank_union_runs_with_masks(models):
    _, bb = models("sd3.5", True)
    z, cond = _latent(batch=2), bb.condition(["", PROMPT])
    controller = BankController(MemoryBank(torch.device("cpu")))
    base, replace = torch.zeros(128, 128, dtype=torch.bool), torch.zeros(128, 128, dtype=torch.bool)
    base[32:96, 32:96], replace[0:64, 0:64] = True, True
    controller.union_masks = {"base": base, "replace": replace}
    with torch.no_grad(), bb.memory_bank(controller):
        with controller.use(CAPTURE, 0):
            bb.predict(z, 900.0, cond)
        with controller.use(UNION, 0):
            out = bb.predict(z[:1], 900.0, cond[1])
    assert out.shape == (1, 16, 16, 16) and torch.isfinite(out).all()


def test_bank_bytes_counts_image_k_and_v_of_the_bank_blocks(models):
    _, bb = models("sd3", True)
    # 2 bank blocks x K and V x 64 tokens x 32 channels x 4 bytes, per step and image
    assert bb.bank_bytes((16, 16), steps=5, images=2) == 2 * 2 * 64 * 32 * 4 * 5 * 2
    assert bb.activation_bytes((128, 128)) == int(SD3Backbone.ACTIVATION_BYTES_PER_CELL * 128 * 128 * 2)


# --------------------------------------------------------------------------------------- VAE and loading


def test_encode_and_decode_use_shift_and_scale(models):
    _, bb = models("sd3", True)
    pixels = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(1)) * 2 - 1
    latent = bb.encode_image(pixels)
    with torch.no_grad():
        mean = bb.vae.encode(pixels).latent_dist.mean
        image = bb.vae.decode(latent / 1.5305 + 0.0609).sample
    assert latent.shape == (1, 16, 16, 16) and bb.vae_factor == 8 and bb.latent_channels == 16
    torch.testing.assert_close(latent, (mean - 0.0609) * 1.5305)
    decoded = bb.decode(latent)
    assert decoded.shape == (128, 128, 3) and decoded.dtype.name == "uint8"
    expected = ((image[0].permute(1, 2, 0) / 2 + 0.5).clamp(0, 1) * 255).round()
    assert (torch.from_numpy(decoded).float() - expected).abs().max() <= 1


@pytest.mark.parametrize("with_t5", [True, False])
def test_from_pretrained_loads_the_saved_weights(models, tmp_path, with_t5):
    pipe, bb = models("sd3.5", with_t5)
    folder = save_tiny_sd3(tmp_path / "tiny-sd3", layout="sd3.5", with_t5=with_t5)
    loaded = SD3Backbone.from_pretrained(str(folder), local_files_only=True)
    assert (loaded.text_encoder_3 is None) == (not with_t5)
    assert loaded.describe()["t5"] == with_t5 and loaded.describe()["prediction_type"] == "flow"
    for mine, theirs in zip(bb.modules, loaded.modules):
        a, b = mine.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(loaded.condition([PROMPT]).text, bb.condition([PROMPT]).text)


def test_accepts_sd3_transformer_configs_only(models):
    _, bb = models("sd3", True)
    config = dict(bb.transformer.config)
    assert SD3Backbone.accepts(config)
    assert SD3Backbone.accepts({**config, "_class_name": "SD3Transformer2DModel"})
    assert not SD3Backbone.accepts({**config, "_class_name": "SD3ControlNetModel"})
    flux = {"_class_name": "FluxTransformer2DModel", "joint_attention_dim": 4096, "pooled_projection_dim": 768}
    assert not SD3Backbone.accepts(flux)
    assert not SD3Backbone.accepts({"in_channels": 4, "cross_attention_dim": 768, "up_block_types": []})


def test_refusals_name_the_part():
    from diffusers import AutoencoderKL

    parts = build_tiny_sd3(seed=0, layout="sd3", with_t5=True)
    four = AutoencoderKL(latent_channels=4, block_out_channels=(8, 16, 32, 32), norm_num_groups=8,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    with pytest.raises(ValueError, match="vae: latent_channels 4 differ from the transformer's in_channels 16"):
        _backbone({**parts, "vae": four})
    with pytest.raises(ValueError, match="text_encoder_3: give the T5 encoder together with its tokenizer"):
        _backbone({**parts, "tokenizer_3": None})
    with pytest.raises(ValueError, match="text_encoder_2"):
        _backbone({**parts, "text_encoder_2": None})
    with pytest.raises(ValueError, match="transformer: expected an SD3Transformer2DModel"):
        _backbone({**parts, "transformer": four})
    bb = SD3Backbone.from_components(**{k: v for k, v in parts.items() if k != "scheduler"})
    with pytest.raises(ValueError, match="no IP-Adapter support on SD3 yet"):
        bb.load_image_prompt(object())
    with pytest.raises(TypeError, match="prompt: expected a string"):
        bb.condition([3])
