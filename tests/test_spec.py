"""EditSpec: validation names the field, defaults come from the task registry once, specs serialise, and
pipe.edit(spec) is what the task methods run."""

import dataclasses
import json
from dataclasses import fields

import numpy as np
import pytest
from PIL import Image

from conftest import FAST, make_scene
from dragondiff import EditSpec
from dragondiff.tasks import TASKS

IMG, DISC, SQUARE = make_scene()


@pytest.mark.parametrize("fields, error, match", [
    (dict(task="rotate"), ValueError, r"^task: unknown task 'rotate'"),
    (dict(task="move"), ValueError, r"^mask: required by task 'move'"),
    (dict(task="drag", mask=DISC), ValueError, r"^points: required by task 'drag'"),
    (dict(task="move", mask=DISC, points=[((1, 1), (5, 5))]), ValueError, r"^points: not used by task 'move'"),
    (dict(task="appearance", mask=DISC, reference=IMG), ValueError, r"^reference_mask: required"),
    (dict(task="move", mask=DISC, offset=(1e20, 0)), ValueError, r"^offset must be finite pixel distances"),
    (dict(task="move", mask=DISC, offset="12,0"), TypeError, r"^offset must be a \(dx, dy\) pair"),
    (dict(task="move", mask=DISC, scale=0), ValueError, r"^scale must be in \(0, 10\]"),
    (dict(task="paste", reference=IMG, reference_mask=SQUARE, scale=5), ValueError, r"^scale must be in \(0, 4\]"),
    (dict(task="move", mask=DISC, seed=2**70), ValueError, r"^seed must be an integer in 0\.\."),
    (dict(task="move", mask=DISC, seed=-1), ValueError, r"^seed must be an integer in 0\.\."),
    (dict(task="move", mask=DISC, bank_steps=(0,)), ValueError, r"^bank_steps: expected a \(first, last\) pair"),
    (dict(task="move", mask=DISC, bank_steps=(30, 10)), ValueError, r"^bank_steps: last step 10 comes before"),
    (dict(task="move", mask=DISC, prompt="a \ud800 cup"), ValueError, r"^prompt: not valid text"),
    (dict(task="move", mask=DISC, preset="quick"), ValueError, r"^preset must be one of"),
    (dict(task="move", mask=DISC, guidance_scale=-1), ValueError, r"^guidance_scale must be a finite number"),
    (dict(task="move", mask=DISC, w_edit="4"), TypeError, r"^w_edit must be a number"),
    (dict(task="move", mask=DISC, num_inference_steps=1001), ValueError, r"^num_inference_steps must be"),
    (dict(task="move", mask=DISC, max_resolution=32), ValueError, r"^max_resolution must be in 64\.\.2048"),
    (dict(task="move", mask=DISC, preset="paper", sde_strength=0.3), ValueError, r"^sde_strength=0.3: the 'paper'"),
    (dict(task="drag", mask=DISC, points=[((1, 1),)]), TypeError, r"^points\[0\]: expected a \(handle, target\)"),
])
def test_validation_names_the_field(fields, error, match):
    with pytest.raises(error, match=match):
        EditSpec(image=IMG, **fields)


def test_resolved_fills_each_default_from_the_registry_and_keeps_what_was_given():
    spec = EditSpec(task="move", image="in.png", mask="m.png", offset=(10, 0), w_edit=7.0)
    full = spec.resolved()
    move = TASKS["move"]
    assert full.params.w_edit == 7.0 and full.w_content == move.params.field("w_content").default
    assert full.gradient_coef == 0.08 and full.bank_steps == (5, None) and full.scale == 1.0
    assert (full.guidance_scale, full.energy_scale) == (move.settings["guidance_scale"], move.settings["energy_scale"])
    assert (full.prompt, full.num_inference_steps, full.max_resolution, full.sde_strength) == ("", 50, 768, 0.4)
    recommended = {"move": {"guidance_scale": 2.0}}
    assert spec.resolved(recommended).guidance_scale == 2.0
    assert EditSpec(task="move", image="a.png", mask="m.png", guidance_scale=3.0).resolved(recommended
                                                                                         ).guidance_scale == 3.0
    # every task declares a default for each weight field it uses, and its official guidance settings
    for info in TASKS.values():
        weights = [f for f in info.params.fields() if f.name.startswith("w_")]
        assert weights and all(isinstance(f.default, float) and f.metadata["doc"] for f in weights)
        assert {"guidance_scale", "energy_scale", "gradient_coef", "bank_steps", "ip_scale"} <= set(info.settings)
        # optional: a task's own SDE strength (where the preset has regional SDE) and a fixed prompt
        assert set(info.settings) - {"guidance_scale", "energy_scale", "gradient_coef", "bank_steps",
                                     "ip_scale"} <= {"sde_strength", "prompt"}


def test_json_round_trip_with_relative_paths(tmp_path):
    spec = EditSpec(task="drag", image="photo.png", mask="editable.png", points=[((10, 20), (30, 20))],
                    prompt="a cat", energy_scale=1.5, seed=7).resolved()
    data = json.loads(spec.to_json())
    assert data["points"] == [[[10.0, 20.0], [30.0, 20.0]]] and data["bank_steps"] == [5, None]
    again = EditSpec.from_dict(data, base_dir=tmp_path)
    assert again.image == str(tmp_path / "photo.png") and again.points == spec.points and again.seed == 7
    with pytest.raises(ValueError, match=r"^colour: unknown field"):
        EditSpec.from_dict({**data, "colour": "red"})
    in_memory = json.loads(EditSpec(task="move", image=IMG, mask=DISC, offset=(4, 0)).to_json())
    assert in_memory["image"] == "<in-memory array 128x128x3 uint8>"
    with pytest.raises(ValueError, match=r"^image: <in-memory array .*> cannot be loaded from a spec"):
        EditSpec.from_dict(in_memory)
    schema = EditSpec.json_schema()
    assert set(data) <= set(schema["properties"]) and schema["properties"]["task"]["enum"] == sorted(TASKS)
    drag = next(c["then"] for c in schema["allOf"] if c["if"]["properties"]["task"]["const"] == "drag")
    assert drag["required"] == ["mask", "points"] and drag["properties"]["offset"] == {"type": "null"}
    assert set(data) == {"task", "image"} | {f.name for f in fields(EditSpec)} - {"params", "task", "image"} | set(
        TASKS["drag"].params.names())  # flat: the task's own fields beside the common ones


def test_edit_runs_the_spec_and_its_result_re_runs(tiny_pipe, tmp_path):
    Image.fromarray(IMG).save(tmp_path / "in.png")
    Image.fromarray(DISC.astype(np.uint8) * 255).save(tmp_path / "mask.png")
    spec = EditSpec(task="move", image=str(tmp_path / "in.png"), mask=str(tmp_path / "mask.png"), offset=(24, 0),
                    prompt="a red disc", max_resolution=128, num_inference_steps=4)
    out = tiny_pipe.edit(spec, progress=False)
    by_method = tiny_pipe.move(IMG, DISC, offset=(24, 0), prompt="a red disc", **{**FAST, "num_inference_steps": 4})
    assert np.array_equal(np.asarray(out.image), np.asarray(by_method.image))
    assert out.spec.w_edit == 4.0 and out.spec.guidance_scale == 4.0 and by_method.spec.task == "move"
    reloaded = EditSpec.from_json(out.spec.to_json())
    assert np.array_equal(np.asarray(tiny_pipe.edit(reloaded, progress=False).image), np.asarray(out.image))
    with pytest.raises(TypeError, match=r"^spec: expected an EditSpec"):
        tiny_pipe.edit({"task": "move"})


def test_params_are_the_tasks_typed_fields():
    from dragondiff.tasks.move import MoveParams

    spec = EditSpec(task="move", image="in.png", mask="m.png", offset=[10, 0])
    assert isinstance(spec.params, MoveParams) and spec.params.offset == (10.0, 0.0) and spec.params.scale == 1.0
    assert spec.offset is spec.params.offset  # the task's fields read as attributes too
    with pytest.raises(AttributeError, match=r"^points: not a field"):
        spec.points
    # the same edit from params (an instance or a dict), and replace() reaching into params
    assert EditSpec(task="move", image="in.png", params=MoveParams(mask="m.png", offset=(10, 0))) == spec
    assert EditSpec(task="move", image="in.png", params={"mask": "m.png", "offset": (10, 0)}) == spec
    assert dataclasses.replace(spec, scale=2.0).params == MoveParams(mask="m.png", offset=(10, 0), scale=2.0)
    with pytest.raises(TypeError, match=r"^params: a MoveParams for task 'drag'"):
        EditSpec(task="drag", image="in.png", params=spec.params)
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'colour'"):
        EditSpec(task="move", image="in.png", mask="m.png", colour="red")
    # another task's fields may be None (old sidecars write them as null), never a value
    assert EditSpec(task="move", image="in.png", mask="m.png", offset=(10, 0), points=None, reference=None) == spec
    # reference_prompt defaults to the prompt when the spec is resolved
    paste = EditSpec(task="paste", image="a.png", reference="r.png", reference_mask="rm.png", prompt="a cat")
    assert paste.params.reference_prompt is None and paste.resolved().params.reference_prompt == "a cat"


def test_flat_and_nested_json_load_the_same_spec(tmp_path):
    flat = {"task": "paste", "image": "a.png", "reference": "r.png", "reference_mask": "rm.png", "scale": 2,
            "mask": None, "points": None, "w_contrast": None, "seed": 3}
    nested = {"task": "paste", "image": "a.png", "params": {"reference": "r.png", "reference_mask": "rm.png",
                                                            "scale": 2}, "seed": 3}
    assert EditSpec.from_dict(flat, tmp_path) == EditSpec.from_dict(nested, tmp_path)
    assert EditSpec.from_dict(flat, tmp_path).params.reference == str(tmp_path / "r.png")
    with pytest.raises(ValueError, match=r"^points: not used by task 'paste'"):
        EditSpec.from_dict({**flat, "points": [[[1, 1], [5, 5]]]})
