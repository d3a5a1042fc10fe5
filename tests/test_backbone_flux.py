"""FLUX.1 backbone on a tiny random FLUX.1-dev-layout model: parity with diffusers' own FluxPipeline preparation and
transformer forward, the truncated feature pass, the memory bank on the joint attention, loading and refusals."""

from fractions import Fraction

import pytest
import torch

from dragondiff.attention import CAPTURE, CONCAT, REPLACE, UNION, BankController, MemoryBank
from dragondiff.backbone_flux import FluxBackbone, FluxBankAttnProcessor, drop_massive_channels
from dragondiff.tiny_flux import build_tiny_flux

PROMPTS = ["a red cat on a mat", "two blue boxes"]


@pytest.fixture(scope="module")
def parts():
    return build_tiny_flux(seed=0)


@pytest.fixture(scope="module")
def pipe(parts):
    from diffusers import FluxPipeline

    return FluxPipeline(**parts)


@pytest.fixture(scope="module")
def bb(parts):
    return FluxBackbone.from_components(parts["transformer"], parts["vae"], parts["text_encoder"], parts["tokenizer"],
                                        parts["text_encoder_2"], parts["tokenizer_2"])


def _latents(batch=2, h=8, w=6, seed=1):
    return torch.randn(batch, 16, h, w, generator=torch.Generator().manual_seed(seed))


def _timestep(pipe, step=1, tokens=12):
    """A timestep from FLUX.1-dev's scheduler as the pipeline sets it (dynamic shift for `tokens` image tokens)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    scheduler = pipe.scheduler
    cfg = scheduler.config
    mu = calculate_shift(tokens, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift)
    scheduler.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25], mu=mu)
    return scheduler.timesteps[step]


def _stock(pipe, bb, z, t, prompts):
    """v from the stock transformer forward with the pipeline's own prepared inputs, unpacked as the pipeline does."""
    b, c, h, w = z.shape
    timestep = t.expand(b).to(z.dtype)
    with torch.no_grad():  # as FluxPipeline.__call__ runs
        embeds, pooled, text_ids = pipe.encode_prompt(prompts, prompt_2=None,
                                                      max_sequence_length=bb.max_sequence_length)
        ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, z.device, embeds.dtype)
        out = pipe.transformer(hidden_states=pipe._pack_latents(z, b, c, h, w), timestep=timestep / 1000,
                               guidance=torch.full([1], bb.embedded_guidance).expand(b), pooled_projections=pooled,
                               encoder_hidden_states=embeds, txt_ids=text_ids, img_ids=ids, return_dict=False)[0]
    return pipe._unpack_latents(out, h * 8, w * 8, 8)


def test_tiny_flux_has_flux_dev_layout_and_runs_in_diffusers_pipeline(parts, pipe):
    tr, vae, sched = parts["transformer"], parts["vae"], parts["scheduler"]
    assert tr.config.in_channels == 4 * vae.config.latent_channels == 64 and tr.config.guidance_embeds
    assert (len(tr.transformer_blocks), len(tr.single_transformer_blocks)) == (2, 2)
    assert (vae.config.shift_factor, vae.config.scaling_factor) == (0.1159, 0.3611)
    assert sched.config.use_dynamic_shifting and (sched.config.base_shift, sched.config.max_shift) == (0.5, 1.15)
    assert parts["text_encoder_2"].config.d_model == tr.config.joint_attention_dim
    image = pipe("a red cat", height=64, width=64, num_inference_steps=2, max_sequence_length=32, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3) and torch.isfinite(torch.from_numpy(image)).all()


def test_condition_equals_the_pipeline_encode_prompt(pipe, bb):
    cond = bb.condition(PROMPTS)
    with torch.no_grad():  # as FluxPipeline.__call__ runs
        embeds, pooled, _ = pipe.encode_prompt(PROMPTS, prompt_2=None, max_sequence_length=bb.max_sequence_length)
    assert cond.text.shape == (2, bb.max_sequence_length, 32) and cond.added["pooled"].shape == (2, 32)
    assert torch.equal(cond.text, embeds.float()) and torch.equal(cond.added["pooled"], pooled.float())
    assert not torch.equal(cond.text[0], cond.text[1])
    assert torch.equal(bb.unconditional(n=2).text, bb.condition(["", ""]).text)


def test_predict_equals_the_stock_transformer_with_the_pipeline_inputs(pipe, bb):
    z, t = _latents(), _timestep(pipe, tokens=12)
    with torch.no_grad():
        v = bb.predict(z, t, bb.condition(PROMPTS))
    expected = _stock(pipe, bb, z, t, PROMPTS)
    assert v.dtype == torch.float32 and v.shape == z.shape
    torch.testing.assert_close(v, expected, rtol=1e-5, atol=1e-5)
    # a float timestep (σ·1000) is read the same way; the embedded guidance is an input that matters
    with torch.no_grad():
        torch.testing.assert_close(bb.predict(z, float(t), bb.condition(PROMPTS)), v, rtol=1e-5, atol=1e-5)
        bb.embedded_guidance = 7.0
        try:
            assert not torch.allclose(bb.predict(z, t, bb.condition(PROMPTS)), v, atol=1e-4)
        finally:
            bb.embedded_guidance = FluxBackbone.DEFAULT_GUIDANCE


def test_features_are_the_feature_blocks_image_tokens_on_the_token_grid(pipe, bb):
    tr = bb.transformer
    assert bb.feature_block_indices() == [0, 1]  # the last two double-stream blocks of a 2-deep tiny model
    z, t, cond = _latents(), _timestep(pipe), bb.condition(PROMPTS)
    seen = {}
    hooks = [tr.transformer_blocks[i].register_forward_hook(lambda m, a, k, out, i=i: seen.__setitem__(i, out[1]),
                                                            with_kwargs=True) for i in (0, 1)]
    try:
        _stock(pipe, bb, z, t, PROMPTS)
    finally:
        for hook in hooks:
            hook.remove()
    ran = []
    guard = tr.single_transformer_blocks[0].register_forward_pre_hook(lambda *a: ran.append(1))
    bb.feature_norm = "raw"
    try:
        with torch.no_grad():
            raw = bb.features(z, t, cond)
    finally:
        bb.feature_norm = "dit"
        guard.remove()
    assert not ran, "the feature pass ran the single-stream blocks"
    for i, fmap in enumerate(raw):
        assert fmap.shape == (2, 32, 4, 3)
        # token (row r, col c) of the packed sequence is feature cell (r, c)
        torch.testing.assert_close(fmap.flatten(2).transpose(1, 2), seen[i], rtol=1e-5, atol=1e-5)


def test_dit_features_are_adaln_normalised_and_differentiable(pipe, bb):
    z = _latents().requires_grad_(True)
    t, cond = _timestep(pipe), bb.condition(PROMPTS)
    assert bb.feature_norm == "dit"
    feats = bb.features(z, t, cond)
    assert [f.shape for f in feats] == [(2, 32, 4, 3)] * 2
    sum(f.pow(2).mean() for f in feats).backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    # block 0's output as block 1's norm1 reads it (layer norm without affine, AdaLN-modulated)
    states, temb = bb.forward(z.detach(), t, cond, stop_after=1)
    normed = bb.transformer.transformer_blocks[1].norm1(states[0], emb=temb)[0]
    expected = drop_massive_channels(normed, states[0], bb.MASSIVE_K)
    torch.testing.assert_close(feats[0].detach().flatten(2).transpose(1, 2), expected.detach())
    with pytest.raises(ValueError, match="feature_norm"):
        bb.feature_norm = "l2"


def test_drop_massive_channels_zeroes_only_the_massive_ones():
    x = torch.randn(2, 50, 16, generator=torch.Generator().manual_seed(0))
    x[0, :, 3] *= 500.0
    x[1, :, 7] += 300.0
    out = drop_massive_channels(x, x, 10.0)  # one channel set for the batch: a channel massive in one sample goes
    assert (out[:, :, 3] == 0).all() and (out[:, :, 7] == 0).all()
    keep = torch.ones(16, dtype=torch.bool)
    keep[[3, 7]] = False
    assert torch.equal(out[:, :, keep], x[:, :, keep])


def test_bank_capture_then_replace_reproduces_the_plain_prediction(pipe, bb):
    z, t, cond = _latents(), _timestep(pipe), bb.condition(PROMPTS)
    before = dict(bb.transformer.attn_processors)
    controller = BankController(MemoryBank(torch.device("cpu")))
    attn = bb.transformer.single_transformer_blocks[1].attn
    seen = {}
    with torch.no_grad():
        plain = bb.predict(z, t, cond)
        with bb.memory_bank(controller):
            hook = attn.register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
            try:
                with controller.use(CAPTURE, 0):
                    captured = bb.predict(z, t, cond)
            finally:
                hook.remove()
            with controller.use(REPLACE, 0):
                replaced = bb.predict(z, t, cond)
            with controller.use(CONCAT, 0):
                concat = bb.predict(z, t, cond)
    assert controller.bank.layers() == bb.bank_layer_names() == ["single_transformer_blocks.1.attn"]
    key, value = controller.bank.entries["single_transformer_blocks.1.attn"][0]
    assert key.shape == value.shape == (2, 12, 32)  # image tokens only, heads x dim, after RoPE
    assert controller.bank.nbytes == bb.bank_bytes((8, 6), steps=1, images=2)
    # the banked keys carry the RoPE positions of the tokens they came from (after the k norm, text tokens dropped)
    from diffusers.models.embeddings import apply_rotary_emb

    text = cond.text.shape[1]
    with torch.no_grad():
        unrotated = attn.norm_k(attn.to_k(seen["hidden_states"]).unflatten(-1, (-1, attn.head_dim)))
        rotated = apply_rotary_emb(unrotated, seen["image_rotary_emb"], sequence_dim=1)
    torch.testing.assert_close(key, rotated[:, text:].flatten(2))
    assert not torch.allclose(key, unrotated[:, text:].flatten(2), atol=1e-3)
    torch.testing.assert_close(captured, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(replaced, plain, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(concat, plain, atol=1e-4)
    after = bb.transformer.attn_processors
    assert all(after[n] is before[n] for n in before)


def test_bank_on_double_stream_blocks_and_union_with_masks(pipe, bb, monkeypatch):
    from dragondiff.backbone_flux import BlockSpan

    monkeypatch.setattr(bb, "BANK_BLOCKS", BlockSpan("double", 0.0))  # every double-stream block: text apart
    z, t, cond = _latents(), _timestep(pipe), bb.condition(PROMPTS)
    controller = BankController(MemoryBank(torch.device("cpu")))
    base = torch.zeros(64, 48, dtype=torch.bool)
    base[:32] = True
    obj = torch.zeros(64, 48, dtype=torch.bool)
    obj[32:, :24] = True
    controller.union_masks = {"base": base, "replace": obj}
    with torch.no_grad():
        plain = bb.predict(z[:1], t, cond[0])
        with bb.memory_bank(controller):
            with controller.use(CAPTURE, 2):
                bb.predict(z[:1], t, cond[0])
            with controller.use(REPLACE, 2):
                replaced = bb.predict(z[:1], t, cond[0])
            with controller.use(CAPTURE, 3):  # base and reference image
                bb.predict(z, t, cond)
            with controller.use(UNION, 3):
                union = bb.predict(z[:1], t, cond[0])
    assert controller.bank.layers() == ["transformer_blocks.0.attn", "transformer_blocks.1.attn"]
    torch.testing.assert_close(replaced, plain, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(union).all() and not torch.allclose(union, plain, atol=1e-4)


def test_bank_processors_are_restored_after_an_error(pipe, bb):
    before = dict(bb.transformer.attn_processors)
    controller = BankController(MemoryBank(torch.device("cpu")))
    with pytest.raises(RuntimeError, match="boom"):
        with bb.memory_bank(controller):
            assert isinstance(bb.transformer.attn_processors["single_transformer_blocks.1.attn.processor"],
                              FluxBankAttnProcessor)
            raise RuntimeError("boom")
    assert all(bb.transformer.attn_processors[n] is p for n, p in before.items())
    assert bb._bank.controller is None


def test_encode_decode_use_the_vae_shift_and_scale(bb):
    pixels = torch.rand(1, 3, 64, 48, generator=torch.Generator().manual_seed(2)) * 2 - 1
    latent = bb.encode_image(pixels)
    with torch.no_grad():
        mean = bb.vae.encode(pixels).latent_dist.mean
    torch.testing.assert_close(latent, (mean - 0.1159) * 0.3611)
    assert latent.shape == (1, 16, 8, 6)
    image = bb.decode(latent)
    assert image.shape == (64, 48, 3) and image.dtype.name == "uint8"


def test_grid_and_description(bb):
    assert bb.latent_channels == 16 and bb.vae_factor == 8 and bb.feature_factor == Fraction(1, 2)
    assert bb.denoiser is bb.transformer and bb.RULE == "flow-euler"
    info = bb.describe()
    assert info["name"] == "FLUX.1" and info["prediction_type"] == "flow" and info["t5"]
    assert bb.image_seq_len((8, 6)) == 12 and bb.image_seq_len((128, 128)) == 4096
    assert bb.prompt_length("ab cd") == 5 and bb.max_prompt_tokens == 64
    # FLUX.1-dev's bank: 19 single blocks x K,V x 4096 tokens x 3072 channels x 2 bytes per step at 1024 px
    assert bb.bank_bytes((128, 128), steps=1) == 1 * 2 * 64 * 64 * 32 * 4  # tiny: 1 block, 32 channels, fp32


def test_from_pretrained_loads_the_saved_weights(bb, tmp_path):
    from dragondiff.tiny_flux import save_tiny_flux

    save_tiny_flux(tmp_path, seed=0)  # FluxPipeline(...).save_pretrained of the same seed's components
    assert {"transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"} <= {
        p.name for p in tmp_path.iterdir()}
    loaded = FluxBackbone.from_pretrained(str(tmp_path), local_files_only=True)
    for mine, theirs in zip(loaded.modules, bb.modules):
        a, b = mine.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(loaded.condition(PROMPTS).text, bb.condition(PROMPTS).text)


def test_refusals_name_the_part(parts, bb):
    args = (parts["text_encoder"], parts["tokenizer"], parts["text_encoder_2"], parts["tokenizer_2"])
    schnell = build_tiny_flux(seed=0, guidance_embeds=False)["transformer"]
    with pytest.raises(ValueError, match="timestep-distilled.*too few"):
        FluxBackbone(schnell, parts["vae"], *args)
    from diffusers import AutoencoderKL

    vae4 = AutoencoderKL(latent_channels=4, block_out_channels=(8, 16), norm_num_groups=8,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    with pytest.raises(ValueError, match="vae: 4 latent channels"):
        FluxBackbone(parts["transformer"], vae4, *args)
    with pytest.raises(ValueError, match="text_encoder_2"):
        FluxBackbone.from_components(parts["transformer"], parts["vae"], parts["text_encoder"], parts["tokenizer"])
    with pytest.raises(TypeError, match="text_encoder_3"):
        FluxBackbone.from_components(parts["transformer"], parts["vae"], *args, text_encoder_3=object())
    with pytest.raises(ValueError, match="even"):
        bb.predict(torch.zeros(1, 16, 7, 6), 500.0, bb.condition(["x"]))
    with pytest.raises(ValueError, match="no IP-Adapter support on FLUX.1"):
        bb.load_image_prompt(object())
    assert FluxBackbone.accepts(dict(parts["transformer"].config))
    assert FluxBackbone.accepts({"_class_name": "FluxTransformer2DModel", "guidance_embeds": False})
    assert not FluxBackbone.accepts({"_class_name": "SD3Transformer2DModel"})
    assert not FluxBackbone.accepts({"in_channels": 4, "cross_attention_dim": 768})


def test_gradient_checkpointing_gives_the_same_feature_gradient(pipe, bb):
    t, cond = _timestep(pipe), bb.condition(PROMPTS[:1])
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            bb.transformer.enable_gradient_checkpointing()
        try:
            z = _latents(batch=1).requires_grad_(True)
            sum(f.pow(2).sum() for f in bb.features(z, t, cond)).backward()
            grads.append(z.grad)
        finally:
            bb.transformer.disable_gradient_checkpointing()
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0])


def test_bfloat16_model_predicts_fp32_close_to_fp32():
    parts = build_tiny_flux(seed=3)
    del parts["scheduler"]
    bb = FluxBackbone.from_components(**parts)
    z, cond = _latents(batch=1), bb.condition(PROMPTS[:1])
    with torch.no_grad():
        full = bb.predict(z, 700.0, cond)
        bb.to(torch.device("cpu"), torch.bfloat16)
        half = bb.predict(z, 700.0, bb.condition(PROMPTS[:1]))
    assert bb.dtype == torch.bfloat16 and half.dtype == torch.float32
    assert (half - full).abs().mean() < 0.1 * full.abs().mean()
