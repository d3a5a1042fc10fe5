"""Loading: diffusers folder layouts (safetensors by default, pickle only on request) and original-layout
single-file checkpoints, all offline."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import FAST as _FAST
from conftest import TINY_MODEL, make_scene
from dragondiff import DragonPipeline

sys.path.insert(0, str(Path(__file__).parent))  # for ldm_export under non-default rootdirs
from ldm_export import export_ldm_checkpoint  # noqa: E402

FAST = dict(_FAST, seed=7)




def _save_folder(pipe, folder: Path, *, unet_safe: bool = True) -> Path:
    from diffusers import DDIMScheduler

    pipe.unet.save_pretrained(folder / "unet", safe_serialization=unet_safe)
    pipe.vae.save_pretrained(folder / "vae", safe_serialization=True)
    pipe.text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
    pipe.tokenizer.save_pretrained(folder / "tokenizer")
    DDIMScheduler.from_config(pipe.scheduler_config).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text((TINY_MODEL / "model_index.json").read_text())
    return folder


def _assert_same_weights(a, b, what):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys(), f"{what}: different parameter names"
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), f"{what}.{k} differs"


@pytest.fixture(scope="module")
def saved_folder(tiny_pipe, tmp_path_factory):
    return _save_folder(tiny_pipe, tmp_path_factory.mktemp("tiny-diffusers"))


def test_from_pretrained_round_trip(tiny_pipe, saved_folder):
    assert list((saved_folder / "unet").glob("*.safetensors")) and not list((saved_folder / "unet").glob("*.bin"))
    loaded = DragonPipeline.from_pretrained(saved_folder, local_files_only=True, device="cpu")
    assert loaded.device == torch.device("cpu") and loaded.dtype == torch.float32
    for name in ("unet", "vae", "text_encoder"):
        _assert_same_weights(getattr(tiny_pipe, name), getattr(loaded, name), name)
    public = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.scheduler_config) == public(tiny_pipe.scheduler_config)
    ids = lambda p: p.tokenizer(["a red disc"], padding="max_length", max_length=77).input_ids  # noqa: E731
    assert ids(loaded) == ids(tiny_pipe)

    img, disc, _ = make_scene()
    a = np.asarray(tiny_pipe.move(img, disc, offset=(24, 8), prompt="a red disc", **FAST).image)
    b = np.asarray(loaded.move(img, disc, offset=(24, 8), prompt="a red disc", **FAST).image)
    assert a.shape == (128, 128, 3)
    # Bitwise-equal weights; at most a rounding step of drift from memory alignment of the loaded tensors.
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99
    # The comparison is meaningful: the loaded text encoder matters (another prompt, another image).
    c = np.asarray(loaded.move(img, disc, offset=(24, 8), prompt="a blue square", **FAST).image)
    assert np.abs(c.astype(int) - b.astype(int)).max() > 1


def test_from_pretrained_missing_folder(tmp_path):
    with pytest.raises(ValueError, match=r"^id_or_folder: .*nothing-here is not a folder"):
        DragonPipeline.from_pretrained(tmp_path / "nothing-here", local_files_only=True, device="cpu")


def test_pickle_only_folder_needs_allow_pickle(tiny_pipe, tmp_path):
    folder = _save_folder(tiny_pipe, tmp_path / "pickled", unet_safe=False)
    unet_files = sorted(p.name for p in (folder / "unet").iterdir())
    assert any(n.endswith(".bin") for n in unet_files) and not any(n.endswith(".safetensors") for n in unet_files)

    with pytest.raises(ValueError, match=r"^id_or_folder: .*allow_pickle=True"):
        DragonPipeline.from_pretrained(folder, local_files_only=True, device="cpu")

    loaded = DragonPipeline.from_pretrained(folder, local_files_only=True, device="cpu", allow_pickle=True)
    _assert_same_weights(tiny_pipe.unet, loaded.unet, "unet")


@pytest.fixture(scope="module")
def exported(parity_pipe, tmp_path_factory):
    path = tmp_path_factory.mktemp("single") / "tiny.safetensors"
    export_ldm_checkpoint(parity_pipe.unet, parity_pipe.vae, parity_pipe.text_encoder, path)
    return path


def test_from_single_file_matches_folder(parity_pipe, exported):
    keys = load_file(str(exported)).keys()
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in keys)  # really the LDM layout
    assert not any(k.startswith("down_blocks.") for k in keys)

    single = DragonPipeline.from_single_file(exported, config=TINY_MODEL, local_files_only=True, device="cpu")
    assert isinstance(single, DragonPipeline) and single.dtype == torch.float32
    for name in ("unet", "vae", "text_encoder"):
        _assert_same_weights(getattr(parity_pipe, name), getattr(single, name), name)
    # str paths work as well
    single2 = DragonPipeline.from_single_file(str(exported), config=str(TINY_MODEL), local_files_only=True,
                                              device="cpu")
    _assert_same_weights(single.unet, single2.unet, "unet")


def test_from_single_file_ckpt_with_allow_pickle(parity_pipe, exported, tmp_path):
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": load_file(str(exported))}, ckpt)
    with pytest.raises(ValueError, match=r"^path: tiny\.ckpt is a pickle checkpoint"):
        DragonPipeline.from_single_file(ckpt, config=TINY_MODEL, local_files_only=True, device="cpu")
    single = DragonPipeline.from_single_file(ckpt, config=TINY_MODEL, local_files_only=True, device="cpu",
                                             allow_pickle=True)
    _assert_same_weights(parity_pipe.unet, single.unet, "unet")


@pytest.mark.parametrize("suffix", [".ckpt", ".CKPT", ".pt", ".pth", ".bin"])
def test_pickle_checkpoint_refused_before_reading(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"not even a pickle")  # were it read, the error would be a load failure, not this one
    with pytest.raises(ValueError, match=r"^path: model\.\w+ is a pickle checkpoint.*allow_pickle=True"):
        DragonPipeline.from_single_file(path, config=TINY_MODEL, local_files_only=True, device="cpu")


def test_single_file_missing_and_unsupported(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^path: checkpoint not found"):
        DragonPipeline.from_single_file(tmp_path / "missing.safetensors", config=TINY_MODEL,
                                        local_files_only=True, device="cpu")
    with pytest.raises(FileNotFoundError, match=r"^path: checkpoint not found"):
        DragonPipeline.from_single_file(tmp_path, config=TINY_MODEL, local_files_only=True, device="cpu")
    other = tmp_path / "model.onnx"
    other.write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match=r"^path: expected a \.safetensors .*got model\.onnx"):
        DragonPipeline.from_single_file(other, config=TINY_MODEL, local_files_only=True, device="cpu")


def test_single_file_corrupt_safetensors(tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(json.dumps({"oops": 1}).encode())
    with pytest.raises(ValueError, match=r"^path: cannot load broken\.safetensors"):
        DragonPipeline.from_single_file(bad, config=TINY_MODEL, local_files_only=True, device="cpu")


def test_recommended_settings_fill_only_what_the_caller_leaves_out(tmp_path, scene):
    """A model folder may carry its own CFG/energy defaults; explicit arguments still win, other tasks keep the
    official demo's values, and the result says what was used."""
    import json
    import shutil

    from dragondiff import DragonPipeline
    from dragondiff.loading import SETTINGS_FILE
    from dragondiff.pipeline import OFFICIAL_SETTINGS

    folder = tmp_path / "model"
    shutil.copytree(TINY_MODEL, folder)
    (folder / SETTINGS_FILE).write_text(json.dumps({"settings": {"move": {"guidance_scale": 2.0, "energy_scale": 1.0}}}))
    pipe = DragonPipeline.from_pretrained(folder, local_files_only=True, device="cpu")
    assert pipe.recommended_settings == {"move": {"guidance_scale": 2.0, "energy_scale": 1.0}}
    img, disc, square = scene
    fast = dict(max_resolution=128, num_inference_steps=2, progress=False)
    assert pipe.move(img, disc, offset=(16, 0), **fast).settings == {"guidance_scale": 2.0, "energy_scale": 1.0}
    assert pipe.move(img, disc, offset=(16, 0), guidance_scale=3.0, **fast).settings == {
        "guidance_scale": 3.0, "energy_scale": 1.0}
    drag = pipe.drag(img, [((36, 44), (50, 44))], disc | square, **fast)
    assert drag.settings == OFFICIAL_SETTINGS["drag"]
    plain = DragonPipeline.from_pretrained(TINY_MODEL, local_files_only=True, device="cpu")
    assert plain.recommended_settings == {}
    assert plain.move(img, disc, offset=(16, 0), **fast).settings == OFFICIAL_SETTINGS["move"]


@pytest.mark.parametrize("settings, match", [
    ({"rotate": {"guidance_scale": 2.0}}, "unknown task 'rotate'"),
    ({"move": {"cfg": 2.0}}, "some of guidance_scale, energy_scale, ip_scale"),
    ({"move": {"guidance_scale": -1}}, r"\['move'\]\['guidance_scale'\]"),
])
def test_bad_recommended_settings_are_named(tmp_path, settings, match):
    import json
    import shutil

    from dragondiff import DragonPipeline
    from dragondiff.loading import SETTINGS_FILE

    folder = tmp_path / "model"
    shutil.copytree(TINY_MODEL, folder)
    (folder / SETTINGS_FILE).write_text(json.dumps({"settings": settings}))
    with pytest.raises(ValueError, match=match):
        DragonPipeline.from_pretrained(folder, local_files_only=True, device="cpu")


def test_building_the_byte_tokenizer_leaves_no_temporary_folder(monkeypatch, tmp_path):
    import tempfile

    from dragondiff.shapes.tokenizer import build_tokenizer

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # every tiny or bundled model load builds one
    tokenizer = build_tokenizer()
    assert list(tmp_path.iterdir()) == []
    assert tokenizer("a red disc").input_ids[0] == 512  # it still reads its vocabulary


@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_a_cpu_without_native_bf16_is_flagged_as_slow(monkeypatch, native):
    import warnings

    from dragondiff import loading
    from dragondiff.errors import PerformanceNote
    from dragondiff.tiny import build_tiny_pipeline

    monkeypatch.setattr(loading, "native_bf16", lambda: native)
    pipe = build_tiny_pipeline(seed=0, device="cpu")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        pipe.to(dtype=torch.bfloat16)
    notes = [w for w in seen if issubclass(w.category, PerformanceNote)]
    assert len(notes) == (0 if native else 1)
    if notes:
        assert "no native bf16" in str(notes[0].message) and "float32" in str(notes[0].message)
    assert pipe.dtype == torch.bfloat16  # accepted all the same
