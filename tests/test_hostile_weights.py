"""Hostile model, adapter and image-encoder files (issue 28, probe 4 findings 7, 8, 9, 12, 16, 17, 18): each is
refused at load, before any edit, naming the component or file and the key; never filled with random weights."""

import json
import os
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import DATA, TINY_MODEL

ENCODER = DATA / "ip-adapter" / "image_encoder"


def _copy_model(tmp_path, name="m"):
    folder = tmp_path / name
    shutil.copytree(TINY_MODEL, folder)
    return folder


def _drop_keys(file, prefix):
    state = load_file(file)
    kept = {k: v for k, v in state.items() if not k.startswith(prefix)}
    assert len(kept) < len(state), f"no key starts with {prefix}"
    save_file(kept, file)


def _add_key(file, key):
    state = load_file(file)
    save_file({**state, key: torch.zeros(3)}, file)


def _edit_index(folder, **changes):
    index = json.loads((folder / "model_index.json").read_text())
    index.update(changes)
    (folder / "model_index.json").write_text(json.dumps(index))


UNET_W = "unet/diffusion_pytorch_model.safetensors"
VAE_W = "vae/diffusion_pytorch_model.safetensors"
TEXT_W = "text_encoder/model.safetensors"


def _other_family(folder, cls_name, pipeline):
    shutil.rmtree(folder / "unet")
    (folder / "transformer").mkdir()
    (folder / "transformer" / "config.json").write_text(json.dumps({"_class_name": cls_name}))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": pipeline,
                                                          "transformer": ["diffusers", cls_name]}))


# (id, how the tiny model folder is broken, what the refusal must say)
BROKEN_MODELS = [
    ("unet-missing-keys", lambda f: _drop_keys(f / UNET_W, "up_blocks.1."),
     r"unet: its weights do not match its configuration: 116 missing \(up_blocks\.1\..*\(116 in all\)"),
    ("vae-missing-keys", lambda f: _drop_keys(f / VAE_W, "decoder.up_blocks.0."),
     r"vae: its weights do not match .*: 18 missing \(decoder\.up_blocks\.0\."),
    ("text-encoder-missing-keys", lambda f: _drop_keys(f / TEXT_W, "text_model.encoder.layers.0."),
     r"text_encoder: its weights do not match .*: \d+ missing \(encoder\.layers\.0\."),
    ("unet-unexpected-key", lambda f: _add_key(f / UNET_W, "up_blocks.9.extra.weight"),
     r"unet: its weights do not match .*1 unexpected \(up_blocks\.9\.extra\.weight\)"),
    ("no-unet-config", lambda f: (f / "unet" / "config.json").unlink(), r"unet/config\.json is missing in "),
    ("no-vae", lambda f: shutil.rmtree(f / "vae"), r"has no vae/ folder"),
    ("no-text-encoder-weights", lambda f: (f / TEXT_W).unlink(), r"text_encoder/ in .* has no weights file"),
    ("pickle-only-unet", lambda f: (torch.save(load_file(f / UNET_W), f / "unet" / "diffusion_pytorch_model.bin"),
                                    (f / UNET_W).unlink()),
     r"unet/ in .* has only pickle \(\.bin\) weights; only \.safetensors weights are loaded unless allow_pickle"),
    ("sdxl-refiner", lambda f: (shutil.rmtree(f / "text_encoder"), _edit_index(
        f, requires_aesthetics_score=True, text_encoder=[None, None], text_encoder_2=["transformers", "X"])),
     r"is an SDXL refiner \(requires_aesthetics_score, no text_encoder\): not supported"),
    ("bad-defaults-json", lambda f: (f / "dragondiff_defaults.json").write_text("{bad json"),
     r"dragondiff_defaults\.json: not a valid settings file"),
    ("pixart", lambda f: _other_family(f, "PixArtTransformer2DModel", "PixArtAlphaPipeline"),
     r"is a PixArt model \(PixArtAlphaPipeline\): not supported yet"),
    ("flux-schnell", lambda f: _schnell(f), r"transformer: a timestep-distilled FLUX transformer .*FLUX\.1-schnell"),
]


def _schnell(folder):
    """A FLUX folder whose transformer has no guidance embedding (FLUX.1-schnell-type): refused from its
    configuration, before any weight is read (the weights file here is empty)."""
    _other_family(folder, "FluxTransformer2DModel", "FluxPipeline")
    config = {"_class_name": "FluxTransformer2DModel", "guidance_embeds": False, "in_channels": 64}
    (folder / "transformer" / "config.json").write_text(json.dumps(config))
    save_file({}, str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))


@pytest.mark.parametrize("name, breaks, message", BROKEN_MODELS, ids=[row[0] for row in BROKEN_MODELS])
def test_broken_model_folders_are_refused_by_component(tmp_path, name, breaks, message):
    """Findings 7, 8, 18: refused at load (ValueError) naming the component, its file or the family; the
    allow_pickle hint only where the weights are pickle-only."""
    from dragondiff import DragonPipeline

    folder = _copy_model(tmp_path)
    breaks(folder)
    with pytest.raises(ValueError, match=message) as refused:
        DragonPipeline.from_pretrained(folder, local_files_only=True, device="cpu")
    assert ("unless allow_pickle=True" in str(refused.value)) == (name == "pickle-only-unet")


def test_weights_left_on_the_meta_device_are_refused():
    """The last safety net: a module with weights never loaded (meta) is refused even with a clean report."""
    from dragondiff.loading import check_loading_info

    with torch.device("meta"):
        module = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"vae: .*2 never loaded \(bias, weight\)"):
        check_loading_info(module, {"missing_keys": set(), "unexpected_keys": set()}, "vae")


def test_cli_refuses_missing_weights_at_load_with_exit_code_2(tmp_path):
    """Finding 7: the command line refuses at load, with exit code 2, naming the component (before any step runs)."""
    from PIL import Image

    from conftest import make_scene
    from test_cli import cli

    folder = _copy_model(tmp_path)
    _drop_keys(folder / VAE_W, "decoder.up_blocks.0.")
    img, disc, _ = make_scene()
    Image.fromarray(img).save(tmp_path / "scene.png")
    Image.fromarray(disc.astype("uint8") * 255).save(tmp_path / "disc.png")
    out = cli("move", tmp_path / "scene.png", "--mask", tmp_path / "disc.png", "--offset", "8,0", "--model", folder,
              "--steps", "50", "--threads", "1", "-o", tmp_path / "x.png")
    assert out.returncode == 2, out.stderr
    assert "vae: its weights do not match its configuration: 18 missing (decoder.up_blocks.0." in out.stderr
    assert "Traceback" not in out.stderr and "meta" not in out.stderr and not (tmp_path / "x.png").exists()


def test_cli_names_other_model_files(tmp_path):
    """Finding 18: an IP-Adapter file given as --model is named as one; a pickle-only folder prints no diffusers
    'error occurred while trying to fetch' line."""
    from test_cli import cli
    from test_image_prompt import _random_adapter, _write

    from dragondiff.tiny import build_tiny_pipeline

    unet = build_tiny_pipeline(seed=0, device="cpu").backbone.unet
    adapter = _write(tmp_path / "ip.safetensors", *_random_adapter(unet, "linear", 4))
    out = cli("move", DATA / "parity" / "inputs" / "image.png", "--mask", DATA / "parity" / "inputs" /
              "object_mask.png", "--offset", "4,0", "--model", adapter, "--config", TINY_MODEL, "--threads", "1",
              "-o", tmp_path / "x.png")
    assert out.returncode == 2 and "ip.safetensors is an IP-Adapter file" in out.stderr, out.stderr
    folder = _copy_model(tmp_path)
    torch.save(load_file(folder / UNET_W), folder / "unet" / "diffusion_pytorch_model.bin")
    (folder / UNET_W).unlink()
    out = cli("move", DATA / "parity" / "inputs" / "image.png", "--mask", DATA / "parity" / "inputs" /
              "object_mask.png", "--offset", "4,0", "--model", folder, "--threads", "1", "-o", tmp_path / "y.png")
    assert out.returncode == 2 and "has only pickle (.bin) weights" in out.stderr, out.stderr
    assert "An error occurred while trying to fetch" not in out.stderr


# ------------------------------------------------------------------------------------------------ image encoders

def _encoder_missing_layer(tmp_path):
    folder = tmp_path / "enc"
    shutil.copytree(ENCODER, folder)
    _drop_keys(folder / "model.safetensors", "vision_model.encoder.layers.0.")
    return folder


# (id, the image_encoder argument from tmp_path, exception, what the refusal must say)
BAD_ENCODERS = [
    ("missing-layer", _encoder_missing_layer, ValueError,
     r"image_encoder: .*its weights do not match its configuration: \d+ missing \(vision_model\.encoder\.layers\.0\."),
    ("text-model-folder", lambda _: TINY_MODEL / "text_encoder", ValueError,
     r"image_encoder: .*text_encoder is a CLIP text model, not a CLIP image encoder"),
    ("unet-folder", lambda _: TINY_MODEL / "unet", ValueError,
     r"image_encoder: .*unet is a diffusers UNet2DConditionModel folder, not a CLIP image encoder"),
    ("an-int", lambda _: 42, TypeError, r"image_encoder: expected a CLIPVisionModelWithProjection folder .* got int"),
    ("a-text-model-object", lambda _: torch.nn.Linear(2, 2), TypeError, r"image_encoder: .* got Linear"),
]


@pytest.mark.parametrize("name, encoder, error, message", BAD_ENCODERS, ids=[row[0] for row in BAD_ENCODERS])
def test_bad_image_encoders_are_refused_by_what_they_are(tmp_path, tiny_pipe, name, encoder, error, message):
    """Findings 8, 12: never random-initialised, never an AttributeError."""
    from test_image_prompt import _random_adapter, _write

    adapter = _write(tmp_path / "ip.safetensors", *_random_adapter(tiny_pipe.backbone.unet, "resampler", 16))
    with pytest.raises(error, match=message):
        tiny_pipe.load_ip_adapter(adapter, encoder(tmp_path))
    assert tiny_pipe.backbone.image_prompt is None


def test_cli_image_encoder_that_is_a_unet_exits_2(tmp_path):
    from test_cli import cli

    from dragondiff.image_prompt import convert_to_safetensors

    adapter = convert_to_safetensors(DATA / "ip-adapter" / "ip_sd15_64.bin", tmp_path / "ip.safetensors")
    out = cli("move", DATA / "parity" / "inputs" / "image.png", "--mask", DATA / "parity" / "inputs" /
              "object_mask.png", "--offset", "4,0", "--model", TINY_MODEL, "--ip-adapter", adapter,
              "--image-encoder", TINY_MODEL / "unet", "--threads", "1", "-o", tmp_path / "x.png")
    assert out.returncode == 2 and "is a diffusers UNet2DConditionModel folder" in out.stderr, out.stderr


# ------------------------------------------------------------------------------------------------ adapter files

def _resampler(unet):
    from test_image_prompt import _random_adapter

    return _random_adapter(unet, "resampler", 16)


def _linear(unet):
    from test_image_prompt import _random_adapter

    return _random_adapter(unet, "linear", 4)


def _changed(base, proj=None, layers=None, drop=()):
    """An adapter from `base` with some projection / layer tensors replaced and some keys dropped."""
    def make(unet):
        p, l = base(unet)
        p, l = {**p, **(proj or {})}, {**l, **(layers or {})}
        return {k: v for k, v in p.items() if k not in drop}, l
    return make


# Probe 4 §12 and §17, one row each: (id, adapter state from the UNet, what the refusal must say)
BAD_ADAPTERS = [
    ("proj_in-1d", _changed(_resampler, {"proj_in.weight": torch.zeros(32)}),
     r"image_proj\.proj_in\.weight has shape \(32,\); expected 2 dimensions"),
    ("linear-proj-0d", _changed(_linear, {"proj.weight": torch.tensor(1.0)}),
     r"image_proj\.proj\.weight has shape \(\); expected a tensor with no empty dimension"),
    ("linear-norm-width-0", _changed(_linear, {"norm.weight": torch.zeros(0)}),
     r"image_proj\.norm\.weight has shape \(0,\)"),
    ("resampler-latents-width-0", _changed(_resampler, {"latents": torch.zeros(1, 16, 0)}),
     r"image_proj\.latents has shape \(1, 16, 0\)"),
    ("missing-projection-key", _changed(_resampler, drop=("layers.1.0.norm1.weight",)),
     r"missing image_proj keys: layers\.1\.0\.norm1\.weight"),
    ("to_q-32-rows", _changed(_resampler, {"layers.0.0.to_q.weight": torch.zeros(32, 32)}),
     r"image_proj\.layers\.0\.0\.to_q\.weight has 32 rows; expected a multiple of 64"),
    ("misshaped-projection-key", _changed(_resampler, {"layers.1.0.norm1.bias": torch.zeros(31)}),
     r"image_proj\.layers\.1\.0\.norm1\.bias is \(31,\), expected \(32,\)"),
    ("unexpected-projection-key", _changed(_resampler, {"layers.0.0.extra.weight": torch.zeros(2)}),
     r"unexpected image_proj keys: layers\.0\.0\.extra\.weight"),
    ("extra-layer-999", _changed(_resampler, layers={"999.to_k_ip.weight": torch.zeros(32, 32)}),
     r"999\.to_k_ip\.weight: no cross-attention layer 999 in this UNet"),
]


@pytest.mark.parametrize("name, make, message", BAD_ADAPTERS, ids=[row[0] for row in BAD_ADAPTERS])
def test_malformed_adapters_are_refused_by_key(tmp_path, tiny_pipe, name, make, message):
    """Findings 12, 17: a ValueError naming the file's key, never an IndexError/ZeroDivisionError or torch's
    message cut before the key."""
    from test_image_prompt import _write

    adapter = _write(tmp_path / "ip.safetensors", *make(tiny_pipe.backbone.unet))
    with pytest.raises(ValueError, match=message):
        tiny_pipe.load_ip_adapter(adapter, ENCODER)
    assert tiny_pipe.backbone.image_prompt is None


def test_zero_byte_and_malicious_bin_keep_their_reason(tmp_path, tiny_pipe):
    """Findings 12, 17: a zero-byte .bin is named as empty (library, convert-ip-adapter, info: exit code 2); a
    malicious one keeps torch's reason and says it could execute code, and never runs."""
    from test_cli import cli

    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"ip_adapter: empty\.bin is empty \(0 bytes\)"):
        tiny_pipe.load_ip_adapter(empty, ENCODER, allow_pickle=True)
    marker = tmp_path / "ran"

    class Code:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    evil = tmp_path / "evil.bin"
    torch.save({"image_proj": Code(), "ip_adapter": {}}, evil)
    with pytest.raises(ValueError, match=r"(?i)refused without running it, as loading it fully could execute code "
                                         r"in it \(torch: .*posix\.system"):
        tiny_pipe.load_ip_adapter(evil, ENCODER, allow_pickle=True)
    for args in (("convert-ip-adapter", empty, tmp_path / "e.safetensors"), ("info", "--ip-adapter", empty),
                 ("convert-ip-adapter", evil, tmp_path / "v.safetensors")):
        out = cli(*args)
        assert out.returncode == 2 and "Traceback" not in out.stderr, (args, out.stderr)
        assert ("is empty" if args[-1] == empty or args[1] == empty else "posix.system") in out.stderr, out.stderr
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ sidecars

def _record(tmp_path, name, encoder=None, encoder_sha=None):
    from dragondiff.image_prompt import file_sha256

    path = tmp_path / name
    if not path.exists():
        path.write_bytes(name.encode())
    return {"id": str(TINY_MODEL), "ip_adapter": {"file": str(path), "sha256": file_sha256(path),
                                                  "image_encoder": encoder, "image_encoder_sha256": encoder_sha}}


def _jobs():
    from dragondiff.cli.runner import Job
    from dragondiff.spec import EditSpec

    spec = EditSpec(task="move", image="x.png", mask="m.png", offset=(1, 1), image_prompt=True)
    return [Job(spec, __import__("pathlib").Path("o.png"), "a.json")]


def test_sidecars_naming_different_adapters_are_refused(tmp_path):
    """Finding 9: `run a.json b.json` never re-runs b with a's adapter; --ip-adapter chooses one for all."""
    from dragondiff.cli.edits import recorded_adapter
    from dragondiff.cli.runner import InputError

    records = [_record(tmp_path, "a.safetensors", str(ENCODER)), _record(tmp_path, "b.safetensors", str(ENCODER))]
    with pytest.raises(InputError, match=r"the sidecars name different IP-Adapters .*a\.safetensors.*b\.safetensors"):
        recorded_adapter(records, _jobs(), {"ip_adapter": None, "image_encoder": None})
    opts = {"ip_adapter": "given.safetensors", "image_encoder": str(ENCODER)}
    recorded_adapter(records, _jobs(), opts)
    assert opts["ip_adapter"] == "given.safetensors"
    same = [_record(tmp_path, "a.safetensors", str(ENCODER))] * 2
    opts = {"ip_adapter": None, "image_encoder": None}
    recorded_adapter(same, _jobs(), opts)
    assert opts == {"ip_adapter": str(tmp_path / "a.safetensors"), "image_encoder": str(ENCODER)}


def test_sidecars_fingerprint_the_image_encoder(tmp_path, tiny_pipe):
    """Finding 16: the sidecar records the encoder folder's sha256; `run` refuses when its weights changed (as for
    the model and the adapter), unless --image-encoder is given."""
    from test_image_prompt import _random_adapter, _write

    from dragondiff.cli.edits import recorded_adapter
    from dragondiff.cli.runner import InputError
    from dragondiff.provenance import model_fingerprint

    encoder = tmp_path / "enc"
    shutil.copytree(ENCODER, encoder)
    adapter = _write(tmp_path / "ip.safetensors", *_random_adapter(tiny_pipe.backbone.unet, "resampler", 16))
    tiny_pipe.load_ip_adapter(adapter, encoder)
    try:
        record = model_fingerprint(tiny_pipe)
    finally:
        tiny_pipe.unload_ip_adapter()
    assert len(record["ip_adapter"]["image_encoder_sha256"]) == 64
    opts = {"ip_adapter": None, "image_encoder": None}
    recorded_adapter([record], _jobs(), opts)  # unchanged: re-runs with the recorded encoder
    assert opts["image_encoder"] == str(encoder)

    state = load_file(encoder / "model.safetensors")
    save_file({k: v + 1 if k.endswith("bias") else v for k, v in state.items()}, encoder / "model.safetensors")
    with pytest.raises(InputError, match=r"model\.ip_adapter\.image_encoder: .*enc changed since the sidecar was "
                                         r"written \(sha256 differs\); pass --image-encoder"):
        recorded_adapter([record], _jobs(), {"ip_adapter": None, "image_encoder": None})
    opts = {"ip_adapter": None, "image_encoder": str(encoder)}  # given: the override, as for --model
    recorded_adapter([record], _jobs(), opts)
    assert opts["image_encoder"] == str(encoder)
