"""LoRAs through diffusers' loaders and peft, on the tiny models: tiny random LoRAs made with peft (diffusers' file
layout) and a kohya (civitai) layout file written here."""

import numpy as np
import pytest
import torch

from conftest import FAST, make_scene

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def write_peft_lora(folder, layout="sd1", seed=1, rank=4, name="pytorch_lora_weights.safetensors", text=True):
    """A random LoRA for the tiny model of `layout`, made by peft and saved in diffusers' layout."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    from dragondiff.tiny import build_tiny_components

    parts = build_tiny_components(0, layout)
    torch.manual_seed(seed)
    config = dict(r=rank, lora_alpha=rank, init_lora_weights=False)
    parts["unet"].add_adapter(LoraConfig(target_modules=UNET_TARGETS, **config))
    layers = {"unet_lora_layers": get_peft_model_state_dict(parts["unet"])}
    if text:
        parts["text_encoder"].add_adapter(LoraConfig(target_modules=TEXT_TARGETS, **config))
        layers["text_encoder_lora_layers"] = get_peft_model_state_dict(parts["text_encoder"])
    if layout == "sdxl":
        StableDiffusionXLPipeline.save_lora_weights(folder, weight_name=name, **layers)
    else:
        StableDiffusionPipeline.save_lora_weights(folder, weight_name=name, **layers)
    return folder / name


def write_kohya_lora(path, seed=2, rank=4):
    """A kohya-layout (civitai) LoRA for the tiny SD1 model: lora_unet_* / lora_te_* with lora_down/up and alpha."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    state = {}
    layers = [("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", 32, 32),
              ("lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn1_to_k", 64, 64),
              ("lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_v", 32, 32),
              # kohya trains every projection of the text encoder's attention (diffusers infers the layout so)
              *[(f"lora_te_text_model_encoder_layers_0_self_attn_{p}_proj", 32, 32) for p in ("q", "k", "v", "out")]]
    for name, fan_in, fan_out in layers:
        state[f"{name}.lora_down.weight"] = torch.randn(rank, fan_in, generator=g) * 0.3
        state[f"{name}.lora_up.weight"] = torch.randn(fan_out, rank, generator=g) * 0.3
        state[f"{name}.alpha"] = torch.tensor(float(rank))
    save_file(state, str(path))
    return path


@pytest.fixture(scope="module")
def pipe():
    from dragondiff.tiny import build_tiny_pipeline

    return build_tiny_pipeline(seed=0, device="cpu")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    (root / "a").mkdir(), (root / "b").mkdir(), (root / "xl").mkdir()
    return {"a": write_peft_lora(root / "a", seed=1), "b": write_peft_lora(root / "b", seed=3, name="b.safetensors"),
            "kohya": write_kohya_lora(root / "kohya.safetensors"),
            "xl": write_peft_lora(root / "xl", layout="sdxl", seed=4), "root": root}


def predict(pipe, prompt="a red disc"):
    """ε of a fixed latent under a prompt (the UNet and the text encoder both in play)."""
    bb = pipe.backbone
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return bb.predict(z, 500, bb.condition([prompt]))


def weights(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_scale_zero_is_no_lora_bit_for_bit_and_unload_restores(pipe, files):
    base, before = predict(pipe), weights(pipe.unet)
    try:
        name = pipe.load_lora_weights(files["a"], scale=0.0)
        assert name == "pytorch_lora_weights" and pipe.loras[0]["scale"] == 0.0
        assert torch.equal(predict(pipe), base)
        pipe.set_lora_scales({name: 1.0})
        changed = predict(pipe)
        assert not torch.allclose(changed, base, atol=1e-4)
        assert pipe.loras[0]["sha256"] and pipe.loras[0]["fused"] is False
    finally:
        pipe.unload_lora_weights()
    assert pipe.loras == []
    assert torch.equal(predict(pipe), base)
    after = weights(pipe.unet)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_fused_equals_unfused_and_unfuse_restores(files):
    """Fusing adds the deltas into the weights, unfusing subtracts them: equal within rounding (its own pipeline:
    the weights after an unfuse are not the original bits)."""
    from dragondiff.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(seed=0, device="cpu")
    base = predict(pipe)
    try:
        pipe.load_lora_weights(files["a"], adapter_name="style", scale=0.7)
        unfused = predict(pipe)
        pipe.fuse_lora()
        assert pipe.loras[0]["fused"] is True
        fused = predict(pipe)
        assert torch.allclose(fused, unfused, atol=1e-5), (fused - unfused).abs().max()
        pipe.set_lora_scales({"style": 0.7})  # re-fused around the same weight
        assert torch.allclose(predict(pipe), unfused, atol=1e-5)
        pipe.unfuse_lora()
        assert torch.allclose(predict(pipe), unfused, atol=1e-5)
    finally:
        pipe.unload_lora_weights()
    assert torch.allclose(predict(pipe), base, atol=1e-5)


def test_a_permanent_fuse_keeps_the_fused_weights_without_peft_wrappers_and_refuses_changes(files):
    """fuse_lora(permanent=True) (what --fuse-lora does): diffusers' unload after the fuse leaves the fused weights
    in plain layers (an edit costs what it costs without LoRAs); changing the LoRAs then needs a fresh model."""
    from dragondiff.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(seed=0, device="cpu")
    pipe.load_lora_weights(files["a"], adapter_name="style", scale=0.7)
    pipe.load_lora_weights(files["kohya"], adapter_name="k", scale=0.5)
    pipe.fuse_lora()
    fused = predict(pipe)
    pipe.fuse_lora(permanent=True)
    assert torch.equal(predict(pipe), fused)
    assert not [m for m in pipe.unet.modules() if hasattr(m, "base_layer")]  # no wrapper left to call
    assert not [m for m in pipe.text_encoder.modules() if hasattr(m, "base_layer")]
    assert [(r["adapter_name"], r["scale"], r["fused"]) for r in pipe.loras] == [("style", 0.7, True), ("k", 0.5, True)]
    for change in (pipe.unfuse_lora, lambda: pipe.set_lora_scales({"style": 1.0}), pipe.unload_lora_weights,
                   lambda: pipe.load_lora_weights(files["b"])):
        with pytest.raises(ValueError, match="fused permanently .* load the model again"):
            change()
    assert torch.equal(predict(pipe), fused)


def test_the_fuse_lora_flag_fuses_for_good(files):
    from dragondiff.cli.runner import apply_loras
    from dragondiff.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(seed=0, device="cpu")
    apply_loras(pipe, [(str(files["a"]), 0.5)], fuse=True)
    assert pipe.loras[0]["fused"] is True and pipe.lora_set.permanent
    assert not [m for m in pipe.unet.modules() if hasattr(m, "base_layer")]


def test_two_loras_with_weights_and_a_kohya_file(pipe, files):
    base = predict(pipe)
    try:
        a = pipe.load_lora_weights(files["a"], scale=0.5)
        k = pipe.load_lora_weights(files["kohya"], scale=1.0)
        assert [r["adapter_name"] for r in pipe.loras] == [a, k] == ["pytorch_lora_weights", "kohya"]
        both = predict(pipe)
        pipe.set_adapters([a], [0.5])  # the kohya LoRA at 0
        only_a = predict(pipe)
        pipe.set_adapters([k], 1.0)
        only_k = predict(pipe)
        for x in (both, only_a, only_k):
            assert not torch.allclose(x, base, atol=1e-5)
        assert not torch.allclose(both, only_a, atol=1e-5) and not torch.allclose(both, only_k, atol=1e-5)
        # LoRA deltas of different layers add up to first order: both ≈ only_a + only_k - base
        assert (both - (only_a + only_k - base)).abs().max() < (both - base).abs().max()
        pipe.unload_lora_weights(k)
        assert [r["adapter_name"] for r in pipe.loras] == [a] and pipe.loras[0]["scale"] == 0.0
    finally:
        pipe.unload_lora_weights()
    assert torch.equal(predict(pipe), base)


def test_memory_bank_and_image_prompt_run_through_lora_layers(pipe, files):
    """peft wraps to_q/to_k/to_v; the bank's and the image prompt's processors call them: an edit runs, the LoRA
    changes it, and the image prompt still changes it."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from dragondiff.image_prompt import random_state

    img, disc, _ = make_scene()
    plain = pipe.move(img, disc, offset=(16, 0), **FAST)
    torch.manual_seed(0)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                                             num_attention_heads=4, image_size=224, patch_size=14,
                                                             projection_dim=32))
    proj, layers = random_state(pipe.backbone.unet, "linear", 4, encoder_width=32, hidden=32, heads=2, depth=2)
    from safetensors.torch import save_file

    path = files["root"] / "ip.safetensors"
    save_file({**{f"image_proj.{k}": v for k, v in proj.items()},
               **{f"ip_adapter.{k}": v for k, v in layers.items()}}, str(path))
    try:
        pipe.load_lora_weights(files["a"])
        with_lora = pipe.move(img, disc, offset=(16, 0), **FAST)
        assert not np.array_equal(np.asarray(with_lora.image), np.asarray(plain.image))
        pipe.load_ip_adapter(path, encoder)
        settings = dict(FAST, num_inference_steps=10)
        on = pipe.move(img, disc, offset=(16, 0), ip_scale=1.0, **settings)
        off = pipe.move(img, disc, offset=(16, 0), image_prompt=False, **settings)
        assert not np.array_equal(np.asarray(on.image), np.asarray(off.image))
    finally:
        pipe.unload_ip_adapter()
        pipe.unload_lora_weights()
    again = pipe.move(img, disc, offset=(16, 0), **FAST)
    assert np.array_equal(np.asarray(again.image), np.asarray(plain.image))


def _refused(pipe, source, match, **kwargs):
    base = weights(pipe.unet)
    with pytest.raises(ValueError, match=match):
        pipe.load_lora_weights(source, **kwargs)
    assert pipe.loras == [] and weights(pipe.unet).keys() == base.keys()  # nothing was added
    assert not any("lora" in n for n, _ in pipe.unet.named_modules())


def test_bad_files_are_refused_by_name_before_any_change(pipe, files, tmp_path):
    from safetensors.torch import load_file, save_file

    _refused(pipe, tmp_path / "missing.safetensors", "missing.safetensors: no such file")
    (tmp_path / "empty_dir").mkdir()
    _refused(pipe, tmp_path / "empty_dir", "empty_dir holds no LoRA weights")
    pickle = tmp_path / "style.bin"
    torch.save(load_file(str(files["a"])), pickle)
    _refused(pipe, pickle, "style.bin is a pickle")
    _refused(pipe, files["xl"], "pytorch_lora_weights.safetensors does not fit this SD1.x model")
    state = load_file(str(files["a"]))
    key = next(k for k in state if k.startswith("unet.") and "lora_A" in k)
    state[key] = torch.zeros(4, 7)
    save_file(state, str(tmp_path / "misshaped.safetensors"))
    _refused(pipe, tmp_path / "misshaped.safetensors", rf"misshaped.safetensors does not fit.*{key}")
    state = load_file(str(files["a"]))
    del state[key.replace("lora_A", "lora_B")]
    save_file(state, str(tmp_path / "half.safetensors"))
    _refused(pipe, tmp_path / "half.safetensors", "half.safetensors does not fit.*has only")
    (tmp_path / "zero.safetensors").write_bytes(b"")
    _refused(pipe, tmp_path / "zero.safetensors", "cannot read zero.safetensors")
    save_file({"conv_in.weight": torch.zeros(3, 3)}, str(tmp_path / "model.safetensors"))
    _refused(pipe, tmp_path / "model.safetensors", r"model.safetensors is not a LoRA.*conv_in.weight")
    state = load_file(str(files["a"]))
    state["lora_unet_nothing_here.lora_down.weight"] = torch.zeros(4, 32)
    save_file(state, str(tmp_path / "mixed.safetensors"))
    _refused(pipe, tmp_path / "mixed.safetensors", "mixed.safetensors")
    state = {k: v for k, v in load_file(str(files["kohya"])).items() if "_te_" in k and "q_proj" in k}
    save_file(state, str(tmp_path / "te_q_only.safetensors"))  # a layout diffusers' converters cannot place
    _refused(pipe, tmp_path / "te_q_only.safetensors", "te_q_only.safetensors: diffusers cannot convert")
    with pytest.raises(ValueError, match="scale must be a finite number"):
        pipe.load_lora_weights(files["a"], scale=float("nan"))
    # a pickle is read with allow_pickle=True (torch's weights-only unpickler)
    try:
        assert pipe.load_lora_weights(pickle, allow_pickle=True) == "style"
    finally:
        pipe.unload_lora_weights()


def test_sdxl_lora_on_both_text_encoders():
    from dragondiff.tiny import build_tiny_pipeline

    import tempfile
    from pathlib import Path

    xl = build_tiny_pipeline(seed=0, layout="sdxl", device="cpu")
    with tempfile.TemporaryDirectory() as d:
        path = write_peft_lora(Path(d), layout="sdxl", seed=4)
        bb = xl.backbone
        z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            base = bb.predict(z, 500, bb.condition(["a"], (128, 128)))
            xl.load_lora_weights(path)
            changed = bb.predict(z, 500, bb.condition(["a"], (128, 128)))
        assert not torch.allclose(base, changed, atol=1e-5)
        assert "pytorch_lora_weights" in bb.text_encoder.peft_config
        xl.unload_lora_weights()
        with torch.no_grad():
            assert torch.equal(bb.predict(z, 500, bb.condition(["a"], (128, 128))), base)


# ------------------------------------------------------------------------------------------------ command line

def cli(*args):
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).parent / "dragondiff"
    exe = str(exe) if exe.exists() else shutil.which("dragondiff")
    return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.fixture(scope="module")
def scene_files(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("cli")
    img, disc, _ = make_scene()
    Image.fromarray(img).save(root / "scene.png")
    Image.fromarray(disc.astype(np.uint8) * 255).save(root / "disc.png")
    return root


def test_command_line_refuses_bad_lora_values(scene_files, files):
    from conftest import TINY_MODEL

    base = ["move", scene_files / "scene.png", "--mask", scene_files / "disc.png", "--model", TINY_MODEL,
            "--threads", "1", "-q", "--offset", "16,0", "--steps", "2", "--max-resolution", "128",
            "-o", scene_files / "never.png"]
    (scene_files / "empty").mkdir(exist_ok=True)
    for value, says in [(f"{files['a']}:abc", "SCALE 'abc' is not a number"), (f"{files['a']}:nan", "finite"),
                        (scene_files / "missing.safetensors", "no such file"),
                        (scene_files / "empty", "holds no LoRA weights")]:
        out = cli(*base, "--lora", value)
        assert out.returncode == 2 and "--lora" in out.stderr and says in out.stderr, (value, out.stderr)
        assert "Traceback" not in out.stderr
    out = cli(*base, "--lora", files["xl"])  # refused by name before the model loads (meta UNet, text encoder)
    assert out.returncode == 2 and "--lora" in out.stderr and "does not fit this SD1.x model" in out.stderr
    assert not (scene_files / "never.png").exists()
    out = cli("info", "--json", "--lora", f"{files['kohya']}:0.5")
    assert out.returncode == 0, out.stderr
    import json

    lora = json.loads(out.stdout)["loras"][0]
    assert lora["layout"] == "kohya" and lora["scale"] == 0.5 and lora["parts"] == ["te", "unet"]


def test_sidecar_records_loras_and_run_reapplies_them(scene_files, tmp_path):
    import json

    from conftest import TINY_MODEL

    lora = write_peft_lora(tmp_path, seed=5, name="style.safetensors")
    common = ["--model", TINY_MODEL, "--threads", "1", "-q", "--steps", "2", "--max-resolution", "128"]
    out = cli("move", scene_files / "scene.png", "--mask", scene_files / "disc.png", "--offset", "16,0",
              "--lora", f"{lora}:0.8", "-o", tmp_path / "with.png", *common)
    assert out.returncode == 0, out.stderr
    out = cli("move", scene_files / "scene.png", "--mask", scene_files / "disc.png", "--offset", "16,0",
              "-o", tmp_path / "without.png", *common)
    assert out.returncode == 0, out.stderr
    from PIL import Image

    read = lambda p: np.asarray(Image.open(p))  # noqa: E731
    assert not np.array_equal(read(tmp_path / "with.png"), read(tmp_path / "without.png"))
    side = json.loads((tmp_path / "with.json").read_text())
    (record,) = side["model"]["loras"]
    assert record["file"] == "style.safetensors" and record["scale"] == 0.8 and record["fused"] is False
    assert len(record["sha256"]) == 64
    assert "loras" not in json.loads((tmp_path / "without.json").read_text())["model"]
    out = cli("run", tmp_path / "with.json", "-o", tmp_path / "again.png", "--threads", "1", "-q")
    assert out.returncode == 0, out.stderr
    assert np.array_equal(read(tmp_path / "again.png"), read(tmp_path / "with.png"))
    write_peft_lora(tmp_path, seed=6, name="style.safetensors")  # the file changes
    out = cli("run", tmp_path / "with.json", "-o", tmp_path / "changed.png", "--threads", "1", "-q")
    assert out.returncode == 2 and "style.safetensors changed since the sidecar was written" in out.stderr
    assert not (tmp_path / "changed.png").exists()
    out = cli("run", tmp_path / "with.json", "-o", tmp_path / "anyway.png", "--threads", "1",
              "--lora", f"{lora}:0.5")
    assert out.returncode == 0 and "other LoRAs than the sidecar recorded" in out.stderr, out.stderr


# ------------------------------------------------------------------------------------------------ from_pipe

def test_from_pipe_shares_storage_and_edits_like_from_pretrained(files):
    """A diffusers pipeline's modules go to the DragonPipeline as they are (same data pointers, its LoRAs with
    them), and an edit equals one by a DragonPipeline loaded from the same folder."""
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    from conftest import TINY_MODEL
    from dragondiff import DragonPipeline

    sd = StableDiffusionPipeline.from_pretrained(TINY_MODEL, safety_checker=None, requires_safety_checker=False,
                                                 local_files_only=True)
    dragon = DragonPipeline.from_pipe(sd)
    for part in ("unet", "vae", "text_encoder"):
        mine, theirs = getattr(dragon, part), getattr(sd, part)
        assert mine is theirs
        assert all(a.data_ptr() == b.data_ptr() for a, b in zip(mine.parameters(), theirs.parameters()))
    assert dragon.model_id == str(TINY_MODEL)
    loaded = DragonPipeline.from_pretrained(TINY_MODEL, local_files_only=True, device="cpu", dtype=torch.float32)
    img, disc, _ = make_scene()
    a = dragon.move(img, disc, offset=(16, 0), **FAST)
    b = loaded.move(img, disc, offset=(16, 0), **FAST)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    # the img2img pipeline of the same modules, with a LoRA loaded by diffusers: it comes along
    i2i = StableDiffusionImg2ImgPipeline(**sd.components)
    i2i.load_lora_weights(str(files["a"].parent), adapter_name="gen")
    shared = DragonPipeline.from_pipe(i2i)
    assert [r["adapter_name"] for r in shared.loras] == ["gen"] and shared.loras[0]["path"] is None
    with_lora = shared.move(img, disc, offset=(16, 0), **FAST)
    assert not np.array_equal(np.asarray(with_lora.image), np.asarray(a.image))
    with pytest.raises(TypeError, match="pipeline: expected a loaded diffusers"):
        DragonPipeline.from_pipe(object())


def test_sidecars_naming_different_loras_are_refused(tmp_path):
    """`run a.json b.json` never re-runs b with a's LoRAs (probe 4, finding 9, for LoRAs): different recorded LoRAs
    are refused unless --lora chooses them for all; the same LoRAs are re-applied."""
    from dragondiff.cli.edits import recorded_loras
    from dragondiff.cli.runner import InputError

    for name in ("a", "b"):
        (tmp_path / f"{name}.safetensors").write_bytes(b"x")

    def record(name, scale=1.0):
        return {"loras": [{"file": f"{name}.safetensors", "path": str(tmp_path / f"{name}.safetensors"),
                           "sha256": None, "scale": scale, "adapter_name": name, "fused": False}]}

    with pytest.raises(InputError, match="the sidecars name different LoRAs"):
        recorded_loras([record("a"), record("b")], {})
    with pytest.raises(InputError, match="the sidecars name different LoRAs"):
        recorded_loras([record("a"), {}], {})
    with pytest.raises(InputError, match="the sidecars name different LoRAs"):
        recorded_loras([record("a"), record("a", 0.5)], {})
    opts = {}
    recorded_loras([record("a"), record("a")], opts)
    assert opts["loras"] == ((str(tmp_path / "a.safetensors"), 1.0),)
    given = {"loras": ((str(tmp_path / "b.safetensors"), 1.0),)}
    recorded_loras([record("a"), record("b")], given)  # --lora given: it is used for all (a note says so)
    assert given["loras"] == ((str(tmp_path / "b.safetensors"), 1.0),)
