"""The image prompt (IP-Adapter): the official IP-move run on the tiny model, the file formats and their checks,
the step window, the ≤77-token rule, the scale, and the two-image routing."""

import json

import numpy as np
import pytest
import torch

from conftest import DATA, PARITY
from test_parity import TOL_FINAL, TOL_INV, TOL_STEP, rel

ADAPTER = DATA / "ip-adapter" / "ip_sd15_64.bin"
ENCODER = DATA / "ip-adapter" / "image_encoder"


@pytest.fixture(scope="module")
def ip_pipe():
    from dragondiff import DragonPipeline
    from conftest import TINY_MODEL

    pipe = DragonPipeline.from_pretrained(TINY_MODEL, local_files_only=True, device="cpu", dtype=torch.float32)
    return pipe.load_ip_adapter(ADAPTER, ENCODER, allow_pickle=True)


@pytest.fixture(scope="module")
def ip_move(ip_pipe):
    cfg = json.loads((PARITY / "IP-move.json").read_text())
    (hx, hy), (tx, ty) = cfg["point_pairs_xy"][0]
    out = ip_pipe.move(PARITY / "inputs" / "image.png", PARITY / "inputs" / "object_mask.png",
                       offset=(tx - hx, ty - hy), prompt=cfg["prompt"], preset="official",
                       max_resolution=cfg["max_resolution"], guidance_scale=cfg["guidance_scale"],
                       energy_scale=cfg["energy_scale_slider"], sde_strength=cfg["SDE_strength"],
                       ip_scale=cfg["ip_scale"], w_edit=cfg["w_edit"], w_content=cfg["w_content"],
                       w_contrast=cfg["w_contrast"], w_inpaint=cfg["w_inpaint"], return_intermediates=True,
                       progress=False)
    return out, np.load(PARITY / "IP-move.npz")


def test_ip_move_matches_the_official_run(ip_pipe, ip_move):
    out, ref = ip_move
    assert out.spec.image_prompt is True and out.pass_counts["image_encoder"] == 2
    # the 141-token context: 77 text tokens, then the 64 image tokens (uncond: the zero image's)
    from dragondiff.image_prompt import PROMPT_SIZE  # noqa: F401 (the module the tokens come from)

    cond, uncond = ip_pipe.backbone.condition([out.spec.prompt]), ip_pipe.backbone.condition([""])
    cond, uncond = ip_pipe.backbone.add_image_prompt(cond, uncond, [np.asarray(out.input_image)], base_as_text=True)
    context = torch.cat([torch.cat([c.text, c.image_tokens], 1) for c in (uncond, cond)])
    assert context.shape == ref["context"].shape
    assert rel(context, ref["context"]) < TOL_INV
    assert rel(out.inverted_latents, ref["inv_latents"]) < TOL_INV
    eps = np.stack([e.numpy() for _, _, e in out.eps_cfg])
    np.testing.assert_array_equal([(i, r) for i, r, _ in out.eps_cfg], ref["eps_cfg_index"])
    np.testing.assert_array_equal([(i, r) for i, r, _ in out.guidance], ref["g_index"])
    for k in range(len(eps)):
        assert rel(eps[k], ref["eps_cfg_all"][k]) < TOL_STEP, f"eps_cfg #{k}"
    for i in range(50):
        assert rel(out.latents[i], ref["latent_after_step"][i]) < TOL_STEP, f"latent after step {i}"
    guid = np.stack([g.numpy() for _, _, g in out.guidance])
    for k in range(len(guid)):
        assert rel(guid[k], ref["g_all"][k]) < TOL_STEP, f"guidance #{k}"
    assert rel(out.latents[-1], ref["final_latent"]) < TOL_FINAL
    diff = np.abs(np.asarray(out.image).astype(int) - ref["final_image"].astype(int))
    assert diff.max() <= 1, diff.max()


def _random_adapter(unet, variant: str, tokens: int) -> tuple[dict, dict]:
    from dragondiff.image_prompt import random_state

    return random_state(unet, variant, tokens, encoder_width=32, hidden=32, heads=2, depth=2)


def _write(path, proj, layers):
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({**{f"image_proj.{k}": v for k, v in proj.items()},
                   **{f"ip_adapter.{k}": v for k, v in layers.items()}}, str(path))
    else:
        torch.save({"image_proj": proj, "ip_adapter": layers}, path)
    return path


@pytest.mark.parametrize("variant, tokens, suffix", [("resampler", 16, ".bin"), ("resampler", 16, ".safetensors"),
                                                     ("linear", 4, ".bin"), ("linear", 4, ".safetensors")])
def test_every_file_format_loads_and_prompts(tmp_path, tiny_pipe, variant, tokens, suffix):
    """IP-Adapter Plus (Resampler, 16 tokens, penultimate hidden states) and IP-Adapter (linear, 4 tokens, pooled
    embeddings), as .bin and as flat .safetensors: detected from the keys, and the edit reads their tokens."""
    from conftest import FAST, make_scene

    unet = tiny_pipe.backbone.unet
    path = _write(tmp_path / f"adapter{suffix}", *_random_adapter(unet, variant, tokens))
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                                             num_attention_heads=4, image_size=224, patch_size=14,
                                                             projection_dim=32))
    img, disc, _ = make_scene()
    try:
        tiny_pipe.load_ip_adapter(path, encoder, allow_pickle=suffix == ".bin")
        prompt = tiny_pipe.backbone.image_prompt
        assert (prompt.variant, prompt.tokens) == (variant, tokens)
        cond, uncond = tiny_pipe.backbone.add_image_prompt(tiny_pipe.backbone.condition(["x"]),
                                                           tiny_pipe.backbone.condition([""]), [img],
                                                           base_as_text=True)
        assert cond.image_tokens.shape == (1, tokens, 32) and uncond.image_tokens.shape == (1, tokens, 32)
        settings = dict(FAST, num_inference_steps=10)
        on = tiny_pipe.move(img, disc, offset=(16, 0), ip_scale=1.0, **settings)
        off = tiny_pipe.move(img, disc, offset=(16, 0), image_prompt=False, **settings)
        assert on.spec.image_prompt and not off.spec.image_prompt
        assert not np.array_equal(np.asarray(on.image), np.asarray(off.image))
    finally:
        tiny_pipe.unload_ip_adapter()
    assert tiny_pipe.backbone.image_prompt is None
    assert not any(".attn2." in n and "ImagePrompt" in type(p).__name__
                   for n, p in tiny_pipe.backbone.unet.attn_processors.items())


def test_the_window_the_text_only_passes_and_the_scale(ip_pipe):
    """The image term acts at grid steps 10..19 only; inversion never sees image tokens; ip_scale=0 is the same as
    no image prompt for a one-image task; a new scale needs no new processors."""
    from conftest import make_scene

    img, disc, _ = make_scene()
    run = lambda **kw: ip_pipe.move(img, disc, offset=(16, 0), max_resolution=128, num_inference_steps=10,  # noqa
                                    return_intermediates=True, progress=False, **kw)
    processors = dict(ip_pipe.backbone.unet.attn_processors)
    on, off = run(ip_scale=1.0), run(image_prompt=False)
    assert torch.equal(on.inverted_latents, off.inverted_latents)
    steps = {i: (e_on, e_off) for (i, _, e_on), (_, _, e_off) in zip(on.eps_cfg, off.eps_cfg)}
    for i, (e_on, e_off) in steps.items():
        active = 10 <= i * 50 // 10 <= 19  # grid steps 10 and 15
        if i < 2:
            assert torch.equal(e_on, e_off), i
        if active:
            assert not torch.equal(e_on, e_off), i
    zero = run(ip_scale=0.0)
    assert np.array_equal(np.asarray(zero.image), np.asarray(off.image))
    assert dict(ip_pipe.backbone.unet.attn_processors) == processors


def test_two_image_routing_official_quirk_and_adapter(ip_pipe):
    """Appearance feeds 128 image tokens. `official` reads the base image's 64 through the text K/V at every step
    (so even ip_scale=0 changes the result); `adapter` reads all 128 through the adapter (ip_scale=0: no effect)."""
    from conftest import make_scene

    img, disc, square = make_scene()
    ref, ref_disc, _ = make_scene(seed=3)
    run = lambda **kw: ip_pipe.replace_appearance(img, disc, ref, ref_disc, max_resolution=128,  # noqa: E731
                                                  num_inference_steps=4, progress=False, **kw)
    off = np.asarray(run(image_prompt=False).image)
    quirk = np.asarray(run(ip_scale=0.0, ip_routing="official").image)
    proper = np.asarray(run(ip_scale=0.0, ip_routing="adapter").image)
    assert not np.array_equal(quirk, off)
    assert np.array_equal(proper, off)
    cond, _ = ip_pipe.backbone.add_image_prompt(ip_pipe.backbone.condition(["x"]), ip_pipe.backbone.condition([""]),
                                                [img, ref], base_as_text=True)
    assert cond.image_tokens.shape[1] == 128 and cond.image_text_tokens == 64


def test_bad_adapter_files_are_refused_by_name(tmp_path, tiny_pipe):
    import os
    import pickle

    unet = tiny_pipe.backbone.unet
    proj, layers = _random_adapter(unet, "resampler", 16)
    with pytest.raises(ValueError, match="is a pickle; convert it"):
        tiny_pipe.load_ip_adapter(_write(tmp_path / "a.bin", proj, layers), ENCODER)
    bad = dict(layers)
    bad.pop(next(iter(bad)))
    with pytest.raises(ValueError, match="has \\['to_v_ip'\\]; expected to_k_ip and to_v_ip"):
        tiny_pipe.load_ip_adapter(_write(tmp_path / "b.safetensors", proj, bad), ENCODER)
    wrong = {k: (v[:, :8].contiguous() if k.startswith("1.") else v) for k, v in layers.items()}
    with pytest.raises(ValueError, match=r"1.to_k_ip.weight has shape \(32, 8\)"):
        tiny_pipe.load_ip_adapter(_write(tmp_path / "c.safetensors", proj, wrong), ENCODER)
    with pytest.raises(ValueError, match="unknown image projection"):
        tiny_pipe.load_ip_adapter(_write(tmp_path / "d.safetensors", {"foo": torch.zeros(2)}, layers), ENCODER)

    marker = tmp_path / "ran"

    class Code:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    (tmp_path / "e.bin").write_bytes(pickle.dumps({"image_proj": Code(), "ip_adapter": {}}))
    with pytest.raises(ValueError, match="not a plain tensor file; refused without running it"):
        tiny_pipe.load_ip_adapter(tmp_path / "e.bin", ENCODER, allow_pickle=True)
    assert not marker.exists()
    with pytest.raises(ValueError, match="image_encoder: an image prompt needs a CLIP image encoder"):
        tiny_pipe.load_ip_adapter(_write(tmp_path / "f.safetensors", proj, layers), None)
    with pytest.raises(FileNotFoundError, match="image_encoder: .*missing is not a folder"):
        tiny_pipe.load_ip_adapter(tmp_path / "f.safetensors", tmp_path / "missing")
    assert tiny_pipe.backbone.image_prompt is None
    with pytest.raises(ValueError, match="image_prompt: true, but no IP-Adapter is loaded"):
        from conftest import make_scene

        img, disc, _ = make_scene()
        tiny_pipe.move(img, disc, offset=(16, 0), image_prompt=True, max_resolution=128, num_inference_steps=2,
                       progress=False)


def test_convert_to_safetensors_gives_the_same_tokens(tmp_path, ip_pipe):
    from dragondiff import image_prompt as ipm

    out = ipm.convert_to_safetensors(ADAPTER, tmp_path / "ip.safetensors")
    a_proj, a_layers = ipm.read_adapter_file(ADAPTER, allow_pickle=True)
    b_proj, b_layers = ipm.read_adapter_file(out, allow_pickle=False)
    assert a_proj.keys() == b_proj.keys() and all(torch.equal(a_proj[k], b_proj[k]) for k in a_proj)
    assert a_layers.keys() == b_layers.keys() and all(torch.equal(a_layers[k], b_layers[k]) for k in a_layers)


def test_bf16_on_cpu():
    """The adapter's modules follow the pipeline's dtype (its own pipeline: a bf16 round trip changes weights)."""
    from conftest import TINY_MODEL, make_scene
    from dragondiff import DragonPipeline

    pipe = DragonPipeline.from_pretrained(TINY_MODEL, local_files_only=True, device="cpu", dtype=torch.bfloat16)
    pipe.load_ip_adapter(ADAPTER, ENCODER, allow_pickle=True)
    assert all(p.dtype == torch.bfloat16 for m in pipe.backbone.image_prompt.modules for p in m.parameters())
    img, disc, _ = make_scene()
    out = pipe.move(img, disc, offset=(16, 0), max_resolution=128, num_inference_steps=10, progress=False)
    assert out.spec.image_prompt and np.asarray(out.image).std() > 0


def test_command_line_image_prompt_and_its_sidecar(tmp_path):
    """convert-ip-adapter, then an edit with --ip-adapter: the sidecar records the adapter, and `run` on it
    re-runs with the recorded adapter to the same pixels. A .bin is refused with the conversion as advice."""
    import json

    from PIL import Image

    from conftest import TINY_MODEL, make_scene
    from test_cli import cli

    img, disc, _ = make_scene()
    Image.fromarray(img).save(tmp_path / "scene.png")
    Image.fromarray(disc.astype(np.uint8) * 255).save(tmp_path / "disc.png")
    out = cli("convert-ip-adapter", ADAPTER, tmp_path / "ip.safetensors")
    assert out.returncode == 0 and "resampler, 64 tokens" in out.stdout, out.stderr
    base = ["move", tmp_path / "scene.png", "--mask", tmp_path / "disc.png", "--offset", "16,0", "--model",
            TINY_MODEL, "--steps", "10", "--max-resolution", "128", "--threads", "1", "-q"]
    out = cli(*base, "--ip-adapter", ADAPTER, "--image-encoder", ENCODER, "-o", tmp_path / "x.png")
    assert out.returncode == 2 and "is a pickle; convert it with `dragondiff convert-ip-adapter`" in out.stderr
    out = cli(*base, "--image-prompt", "--dry-run", "-o", tmp_path / "x.png")
    assert out.returncode == 2 and "image_prompt is true; give the adapter with --ip-adapter" in out.stderr
    out = cli(*base, "--ip-adapter", tmp_path / "ip.safetensors", "--image-encoder", ENCODER, "--ip-scale", "0.5",
              "-o", tmp_path / "a.png")
    assert out.returncode == 0, out.stderr
    sidecar = json.loads((tmp_path / "a.json").read_text())
    assert sidecar["spec"]["image_prompt"] is True and sidecar["spec"]["ip_scale"] == 0.5
    assert sidecar["model"]["ip_adapter"]["variant"] == "resampler" and sidecar["model"]["ip_adapter"]["tokens"] == 64
    out = cli("run", tmp_path / "a.json", "-o", tmp_path / "b.png", "--threads", "1", "-q")
    assert out.returncode == 0, out.stderr
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))
    out = cli("info", "--ip-adapter", tmp_path / "ip.safetensors", "--model", TINY_MODEL)
    assert out.returncode == 0 and "ip_adapter tokens: 64" in out.stdout


def test_a_text_only_context_is_plain_cross_attention(ip_pipe, parity_pipe):
    """With the adapter's processors installed, a context of 77 tokens gives what the stock processors give (the
    official ≤77 rule), and image tokens at scale 0 only drop out of a one-image context."""
    from dataclasses import replace

    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = ip_pipe.backbone.condition(["a photo of a red ball", ""])
    plain = parity_pipe.backbone.predict(z, 501, cond)
    assert torch.allclose(ip_pipe.backbone.predict(z, 501, cond), plain, atol=1e-6)
    tokens = torch.randn(2, 64, 32, generator=torch.Generator().manual_seed(1))
    unscaled = replace(cond, image_tokens=tokens, image_scale=0.0)
    assert torch.allclose(ip_pipe.backbone.predict(z, 501, unscaled), plain, atol=1e-6)
    assert not torch.allclose(ip_pipe.backbone.predict(z, 501, unscaled.with_image_scale(1.0)), plain, atol=1e-4)
