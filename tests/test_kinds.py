"""The parameter kinds (`dragondiff.tasks.params.KINDS`): each kind is one object holding its value check, JSON
schema, CLI option, file check and range text, and the spec, the CLI and the input check only look it up, so a
new kind is one entry in KINDS (plus its click type in `cli.options.CLI_TYPES` when its CLI type name is new)."""

import dataclasses
from typing import Any

import click
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from dragondiff import spec as S
from dragondiff.cli import options as O
from dragondiff.cli.runner import InputError, check_inputs
from dragondiff.spec import EditSpec
from dragondiff.tasks import TASKS, TaskInfo
from dragondiff.tasks import params as P

PALETTE = ("red", "green", "blue")


def test_every_kind_has_its_check_schema_cli_option_read_and_range():
    assert set(P.KINDS) == {P.IMAGE, P.MASK, P.OFFSET, P.POINTS, P.SCALE, P.NUMBER, P.TEXT, P.LANDMARKS, P.GROUPS,
                            P.FACE}
    for name, kind in P.KINDS.items():
        assert isinstance(kind, P.Kind) and isinstance(kind.cli, P.CliOption), name
        assert all(callable(part) for part in (kind.check, kind.schema, kind.read, kind.range_text, kind.cli.help))
        assert kind.cli.type in O.CLI_TYPES, f"{name}: CLI type {kind.cli.type!r} has no click type"
    used = set()
    for info in TASKS.values():
        for f in info.params.fields():
            kind = P.kind_of(f)
            used.add(f.metadata["kind"])
            schema = kind.schema(f)
            assert schema["description"].startswith(f.metadata["doc"]), f.name
            assert isinstance(kind.range_text(f), str) and kind.cli.help(f).startswith(f.metadata["doc"])
    assert used == set(P.KINDS)  # no kind is left unused
    assert P.SOURCE_KINDS == (P.IMAGE, P.MASK)
    with pytest.raises(ValueError, match=r"^kind: unknown parameter kind 'colours'; known: image, mask"):
        P.param(kind="colours", doc="colours")


class ColoursType(click.ParamType):
    """'red,blue' -> ('red', 'blue'): each value of a repeated option is a tuple, joined by `task_fields`."""

    name = "C,C"

    def convert(self, value, param, ctx):
        return tuple(value.split(","))


def _check_colours(f, value):
    names = tuple(value.split(",")) if isinstance(value, str) else tuple(value)
    for name in names:
        if name not in PALETTE:
            raise ValueError(f"{f.name}: unknown colour {name!r}; allowed: {', '.join(PALETTE)}")
    return names


def _read_colours(f, value, images):
    height, width = images["image"].shape[:2]
    if "blue" in value and height < 64:
        raise ValueError(f"{f.name}: blue needs an image at least 64 px high, got {width}x{height}")


@pytest.fixture
def paint(monkeypatch):
    """A 'colours' kind and a 'paint' task using it, registered only in the registries."""
    kind = P.Kind(check=_check_colours,
                  schema=lambda f: {"type": ["array", "null"], "items": {"enum": list(PALETTE)},
                                    "description": f.metadata["doc"]},
                  cli=P.CliOption("colours", multiple=True, required=True), read=_read_colours,
                  range_text=lambda f: " | ".join(PALETTE))
    monkeypatch.setitem(P.KINDS, "colours", kind)
    monkeypatch.setitem(O.CLI_TYPES, "colours", ColoursType())

    @dataclasses.dataclass(frozen=True)
    class PaintParams(P.Params):
        colours: Any = P.param(kind="colours", doc="the colours to paint")

    monkeypatch.setitem(TASKS, "paint", TaskInfo(name="paint", build=None, params=PaintParams, settings={}))
    monkeypatch.setitem(S.PARAM_FIELDS, "colours", PaintParams.field("colours"))
    return PaintParams


def test_a_new_kind_is_one_registry_entry(paint, tmp_path):
    # check_value: the kind's check, normalising and naming the field
    assert paint(colours="red,blue").colours == ("red", "blue")
    with pytest.raises(ValueError, match=r"^colours: unknown colour 'teal'; allowed: red, green, blue"):
        paint(colours=["teal"])
    # the JSON schema: the kind's, in the task's clause and the properties
    schema = EditSpec.json_schema()
    want = {"type": ["array", "null"], "items": {"enum": list(PALETTE)}, "description": "the colours to paint"}
    assert schema["properties"]["colours"] == want
    clause = next(c["then"] for c in schema["allOf"] if c["if"]["properties"]["task"]["const"] == "paint")
    assert clause["required"] == ["colours"] and clause["properties"]["colours"] == want
    # the CLI option: the kind's type (a new CLI type name), repeated, required, help with its range; values joined
    @click.command()
    @O.task_options("paint")
    def paint_command(**opts):
        click.echo(repr(O.task_fields("paint", opts)))

    runner = CliRunner()
    result = runner.invoke(paint_command, ["--colours", "red,green", "--colours", "blue"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "{'colours': ('red', 'green', 'blue')}"
    assert "Missing option '--colours'" in runner.invoke(paint_command, []).output
    help_text = " ".join(runner.invoke(paint_command, ["--help"]).output.split())
    assert "--colours C,C the colours to paint; range red | green | blue" in help_text
    # check_inputs: the kind's file check, given the images read so far
    for height in (64, 32):
        Image.fromarray(np.zeros((height, 48, 3), np.uint8)).save(tmp_path / f"{height}.png")
    assert check_inputs(EditSpec(task="paint", image=str(tmp_path / "64.png"), colours="blue"), "edit 1") is None
    spec = EditSpec(task="paint", image=str(tmp_path / "32.png"), colours=("red", "blue"))
    assert spec.params.colours == ("red", "blue")
    with pytest.raises(InputError, match=r"^edit 1: colours: blue needs an image at least 64 px high, got 48x32"):
        check_inputs(spec, "edit 1")
    check_inputs(EditSpec(task="paint", image=str(tmp_path / "32.png"), colours="red"), "edit 1")
