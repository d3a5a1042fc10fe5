"""One plan per edit: `planning.plan_edit` needs no model, `pipe.edit` takes a `Plan` made for its model's grid and
settings as it is (and refuses one made for another), and the command line plans a single edit once."""

import numpy as np
import pytest
from PIL import Image

from conftest import FAST, TINY_MODEL, make_scene
from dragondiff import EditSpec
from dragondiff.inputs import Prepared
from dragondiff.planning import Plan, plan_edit


def _spec():
    img, disc, _ = make_scene()
    return EditSpec(task="move", image=img, mask=disc, offset=(16, 0), max_resolution=128, num_inference_steps=2)


def test_a_plan_is_edited_as_it_is_and_refused_for_another_grid(tiny_pipe):
    spec = _spec()
    plan = tiny_pipe.plan(spec)
    assert isinstance(plan, Plan) and tiny_pipe.takes_plan(plan)
    resolved, prep, task = plan  # unpacks as (spec, prep, task)
    assert resolved.num_inference_steps == 2 and prep.size_hw == (128, 128) and task is plan.task
    from_plan = tiny_pipe.edit(plan, progress=False)
    from_spec = tiny_pipe.edit(spec, progress=False)
    assert np.array_equal(np.asarray(from_plan.image), np.asarray(from_spec.image))
    assert from_plan.spec == from_spec.spec
    other = plan_edit(spec, factors=(8, 1))  # another model's feature grid
    assert not tiny_pipe.takes_plan(other)
    with pytest.raises(ValueError, match="spec: this Plan was made for another model's grid or settings"):
        tiny_pipe.edit(other, progress=False)
    with pytest.raises(TypeError, match="spec: expected an EditSpec"):
        plan_edit({"task": "move"}, factors=(8, 2))


def test_the_command_line_plans_a_single_edit_once(tmp_path, monkeypatch, capsys):
    """The pre-check's plan (made from the model's configuration files) is the edit's: the image is prepared once.
    A run of two jobs plans each again when it runs (one job's inputs held at a time)."""
    from dragondiff.cli import main

    img, disc, _ = make_scene()
    Image.fromarray(img).save(tmp_path / "scene.png")
    Image.fromarray(disc.astype(np.uint8) * 255).save(tmp_path / "disc.png")
    calls = []
    original = Prepared.from_image.__func__
    monkeypatch.setattr(Prepared, "from_image", classmethod(lambda cls, *a: calls.append(1) or original(cls, *a)))
    args = ["move", str(tmp_path / "scene.png"), "--mask", str(tmp_path / "disc.png"), "--offset", "16,0",
            "--model", str(TINY_MODEL), "--steps", str(FAST["num_inference_steps"]), "--max-resolution", "128",
            "--threads", "1", "-q", "-o", str(tmp_path / "moved.png")]
    assert main(args) == 0, capsys.readouterr().err
    assert len(calls) == 1
    calls.clear()
    assert main(["run", str(tmp_path / "moved.json"), "-q", "--threads", "1", "-o", str(tmp_path / "again.png")]) == 0
    assert len(calls) == 1  # `run` of one sidecar: one job, one plan
    assert np.array_equal(np.asarray(Image.open(tmp_path / "moved.png")),
                          np.asarray(Image.open(tmp_path / "again.png")))
