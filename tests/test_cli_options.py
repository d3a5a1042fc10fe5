"""CLI options at the edges, in-process and without model work: what --dry-run refuses (and the real run refuses
before loading), -h and --debug on every command, refusals naming the real option, hostile option values."""

import warnings

import click
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import DATA, TINY_MODEL, make_scene

ADAPTER = DATA / "ip-adapter" / "ip_sd15_64.bin"
ENCODER = DATA / "ip-adapter" / "image_encoder"


@pytest.fixture
def run_cli(monkeypatch, capsys):
    """dragondiff's main in this process: (exit code, stdout, stderr). Records any model load instead of doing it."""
    from dragondiff.cli import main, runner

    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # main replaces it
    loads = []
    monkeypatch.setattr(runner, "load_pipeline", lambda *a, **k: loads.append(a) or pytest.fail("model loaded"))

    def call(*args):
        code = main([str(a) for a in args])
        out = capsys.readouterr()
        return code, out.out, out.err

    call.loads = loads
    return call


@pytest.fixture
def scene(tmp_path, monkeypatch):
    img, disc, _ = make_scene(size=64)
    Image.fromarray(img).save(tmp_path / "scene.png")
    Image.fromarray(disc.astype(np.uint8) * 255).save(tmp_path / "disc.png")
    (tmp_path / "afolder").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


MOVE = ["move", "scene.png", "--mask", "disc.png", "--offset", "8,0", "--model", TINY_MODEL, "--threads", "1", "-q"]


def _adapter_files(folder):
    """The tiny model's adapter as .safetensors, and a copy missing cross-attention layer 1's projections."""
    from safetensors.torch import save_file

    from dragondiff.image_prompt import read_adapter_file

    proj, layers = read_adapter_file(ADAPTER)
    flat = {**{f"image_proj.{k}": v for k, v in proj.items()}, **{f"ip_adapter.{k}": v for k, v in layers.items()}}
    save_file(flat, str(folder / "fits.safetensors"))
    save_file({k: v for k, v in flat.items() if not k.startswith("ip_adapter.1.")}, str(folder / "missing.safetensors"))


# ------------------------------------------------------------------ finding 19: --dry-run refuses what the load would

DRY_RUN_ROWS = [
    (["--device", "cuda"], "--device: 'cuda' but this torch build or machine has no CUDA device"),
    (["--device", "mps"], "--device: 'mps' but MPS is not available here"),
    (["--dtype", "float64"], "--dtype: 'float64' is not supported"),
    (["--ip-adapter", "missing.safetensors", "--image-encoder", ENCODER], "no weights for cross-attention layer 1"),
    (["--config", TINY_MODEL], "--config"),
    (["--model", "afolder"], "--model afolder: not a diffusers model folder"),
]


@pytest.mark.parametrize("args, message", DRY_RUN_ROWS, ids=[" ".join(map(str, a[:2])) for a, _ in DRY_RUN_ROWS])
@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "real run"])
def test_dry_run_refuses_what_the_load_refuses(scene, run_cli, args, message, dry_run):
    if "cuda" in args and torch.cuda.is_available() or "mps" in args and torch.backends.mps.is_available():
        pytest.skip("the device exists here")
    _adapter_files(scene)
    code, _, err = run_cli(*MOVE, *args, *(["--dry-run"] if dry_run else []))
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not run_cli.loads  # the real run refused before loading the model


def test_a_fitting_adapter_passes_the_dry_run(scene, run_cli):
    _adapter_files(scene)
    code, out, err = run_cli(*MOVE, "--ip-adapter", "fits.safetensors", "--image-encoder", ENCODER, "--dry-run")
    assert code == 0 and "move: valid" in out, err


def _lora_files(folder):
    """Written with safetensors alone (no diffusers pipeline import under the captured streams): an SDXL-shaped LoRA
    (layers of a second text encoder, 64-wide attention where the tiny SD1 model has 32), a kohya one with a
    misshaped layer, and one that fits (kohya layout)."""
    from safetensors.torch import save_file
    from test_lora import write_kohya_lora

    attn = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k"
    save_file({f"unet.{attn}.lora_A.weight": torch.zeros(4, 64), f"unet.{attn}.lora_B.weight": torch.zeros(64, 4),
               "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 32),
               "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(32, 4)},
              str(folder / "xl.safetensors"))
    layer = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{layer}.lora_down.weight": torch.zeros(4, 48), f"{layer}.lora_up.weight": torch.zeros(32, 4),
               f"{layer}.alpha": torch.tensor(4.0)}, str(folder / "misshaped.safetensors"))
    write_kohya_lora(folder / "fits.safetensors")


LORA_ROWS = [("xl.safetensors", "is it for another model family?"),
             ("misshaped.safetensors", "shape (4, 48) for a layer 32 -> 32")]


@pytest.mark.parametrize("lora, message", LORA_ROWS, ids=["sdxl", "misshaped"])
@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "real run"])
def test_a_lora_that_does_not_fit_is_refused_before_the_model_loads(scene, run_cli, lora, message, dry_run):
    _lora_files(scene)
    code, _, err = run_cli(*MOVE, "--lora", f"{lora}:0.5", *(["--dry-run"] if dry_run else []))
    assert code == 2 and f"--lora {lora}" in err and message in err and "Traceback" not in err, err
    assert not run_cli.loads  # checked against the UNet built on the meta device, not the loaded model


def test_a_fitting_lora_passes_the_dry_run(scene, run_cli):
    _lora_files(scene)
    code, out, err = run_cli(*MOVE, "--lora", "fits.safetensors", "--dry-run")
    assert code == 0 and "move: valid" in out, err


def test_batch_dry_run_checks_the_device(scene, run_cli):
    (scene / "specs").mkdir()
    (scene / "specs" / "e.json").write_text('{"task": "move", "image": "../scene.png", "mask": "../disc.png", '
                                            '"offset": [8, 0]}')
    code, _, err = run_cli("batch", "specs", "-o", "out", "--model", TINY_MODEL, "--dtype", "float64", "--dry-run")
    assert code == 2 and "--dtype: 'float64' is not supported" in err, err


# ------------------------------------------------------------------------------- finding 21: -h, --debug, wording

def _commands(group=None, path=()):
    from dragondiff.cli import cli

    group = group or cli
    for name, command in sorted(group.commands.items()):
        yield (*path, name), command
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))


def _command_paths():
    from dragondiff.cli.misc import BENCHMARKS

    return [path for path, _ in _commands()] + [("bench", which) for which in BENCHMARKS]


@pytest.mark.parametrize("path", _command_paths(), ids=" ".join)
def test_every_command_accepts_h_and_debug(run_cli, path):
    for flag in ("-h", "--help"):
        code, out, err = run_cli(*path, flag)
        assert code == 0 and "usage:" in out.lower(), (flag, err)
    code, out, err = run_cli(*path, "--debug", "-h")  # --debug is known everywhere (the error hint names it)
    assert code == 0 and "usage:" in out.lower(), err


def test_click_commands_have_debug():
    for path, command in _commands():
        if path != ("bench",):  # the dispatcher: each benchmark has it (test above)
            assert any("--debug" in p.opts for p in command.params), path


def test_the_traceback_hint_only_without_debug(run_cli, monkeypatch):
    import dragondiff.provenance

    def broken():
        raise RuntimeError("boom")

    monkeypatch.setattr(dragondiff.provenance, "package_versions", broken)
    code, _, err = run_cli("info")
    assert code == 1 and "Error: RuntimeError: boom  (--debug shows the traceback)" in err
    code, _, err = run_cli("info", "--debug")
    assert code == 1 and "Traceback" in err and "Error: RuntimeError: boom" in err and "--debug shows" not in err


def test_refusals_name_the_real_option(scene, run_cli):
    (scene / "demo").mkdir()
    (scene / "demo" / "input.png").write_bytes(b"")
    code, _, err = run_cli("demo", "--out", "demo", "--tiny")
    assert code == 2 and "choose another --out" in err and "another -o" not in err, err
    (scene / "ip.safetensors").write_bytes(b"")
    code, _, err = run_cli("convert-ip-adapter", ADAPTER, "ip.safetensors")
    assert code == 2 and "choose another TARGET" in err and "another -o" not in err, err


@pytest.mark.parametrize("option, value", [("--ip-scale", "0.5"), ("--ip-routing", "adapter"),
                                           ("--image-encoder", ENCODER)])
def test_image_prompt_options_need_the_adapter(scene, run_cli, option, value):
    code, _, err = run_cli(*MOVE, option, value, "--dry-run")
    assert code == 2 and f"{option}: given without --ip-adapter" in err, err


# -------------------------------------------------------------------------- item 9: hostile values of CLI options

HOSTILE = [  # (option, value, what the message must name)
    ("IMAGE", "afolder", "IMAGE"), ("IMAGE", "/dev/zero", "image"), ("--mask", "afolder", "--mask"),
    ("--mask", "/dev/zero", "mask"), ("--mask", "scene.png-missing", "mask"),
    ("--offset", "nan,0", "--offset"), ("--offset", "1e400,0", "--offset"),
    ("--offset", "99999999999999999999,0", "offset"),
    ("--offset", "1", "--offset"), ("--scale", "nan", "scale"), ("--scale", "inf", "scale"), ("--scale", "-1", "scale"),
    ("--scale", "abc", "--scale"), ("--steps", "-5", "--steps"), ("--steps", "99999999999999999999", "--steps"),
    ("--steps", "2.5", "--steps"), ("--seed", "-1", "--seed"), ("--seed", "1e3", "--seed"),
    ("--max-resolution", "0", "--max-resolution"), ("--max-resolution", "99999999", "--max-resolution"),
    ("--guidance-scale", "nan", "guidance_scale"), ("--energy-scale", "inf", "--energy-scale"),
    ("--gradient-coef", "-1", "--gradient-coef"), ("--ip-scale", "nan", "ip_scale"), ("--w-edit", "nan", "w_edit"),
    ("--w-content", "1e400", "w_content"), ("--w-edit", "-1", "w_edit"), ("--threads", "0", "--threads"),
    ("--threads", "many", "--threads"), ("--preset", "bogus", "--preset"), ("--prompt", "x" * 100_000, "prompt"),
    ("--device", "gpu", "--device"), ("--device", "cuda:99", "--device"), ("--dtype", "int8", "--dtype"),
    ("--model", "/dev/zero", "--model"), ("--model", "afolder", "--model"), ("--model", "no/such/model", "--model"),
    ("--model", "x.safetensors", "--model"), ("--ip-adapter", "afolder", "--ip-adapter"),
    ("--ip-adapter", "/dev/zero", "--ip-adapter"), ("--ip-adapter", "scene.png", "--ip-adapter"),
    ("--ip-routing", "bogus", "--ip-routing"), ("-o", "afolder", "output"), ("-o", "x.txt", "output"),
    ("-o", "/proc/x.png", "output"), ("-o", "scene.png", "output"),
]


@pytest.mark.parametrize("option, value, named", HOSTILE, ids=[f"{o} {v[:24]}" for o, v, _ in HOSTILE])
def test_hostile_option_values_are_refused_by_name(scene, run_cli, option, value, named):
    args = [a if a != "scene.png" or option != "IMAGE" else value for a in MOVE]
    if option == "--mask":
        args[args.index("--mask") + 1] = value
    elif option == "--offset":
        args[args.index("--offset") + 1] = value
    elif option == "--model":
        args[args.index("--model") + 1] = value
    elif option != "IMAGE":
        args += [option, value]
    if option == "-o" and value == "scene.png":
        args.append("--overwrite")  # the input itself, even with --overwrite
    code, _, err = run_cli(*args, "--dry-run")
    assert code == 2, err
    assert named in err and "Traceback" not in err, err
    assert not run_cli.loads
