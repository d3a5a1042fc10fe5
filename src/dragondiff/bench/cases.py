"""Seeded benchmark cases with ground truth. Each task declares its cases (`TaskInfo.bench`: a generator, an
evaluator and a seed offset per case name; move declares "move" and "resize"); this module draws them.

Each case holds the inputs of one edit (image, masks, offset/points, reference) and the ground-truth scene after
the edit, so metrics compare the output with what the generator knows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..shapes.scenes import CASE_SEED_BASE, Scene, random_scene
from ..tasks import TASKS
from ..tasks.base import BenchCase, TaskInfo

# benchmark case name -> (the task that runs it, its declaration), in registry order
BENCH_CASES: dict[str, tuple[TaskInfo, BenchCase]] = {
    name: (info, case) for info in TASKS.values() for name, case in info.bench.items()}


@dataclass
class Case:
    task: str  # the benchmark case name (e.g. "resize"); BENCH_CASES says which task runs it
    seed: int
    scene: Scene  # input
    target: Scene  # ground truth after the edit
    index: int  # the edited object in `scene` (for paste: in `reference`)
    kwargs: dict = field(default_factory=dict)  # EditSpec fields besides task, image and prompt
    reference: Scene | None = None
    target_index: int = 0  # the edited/pasted object's index in `target`
    prompt: str | None = None  # the edit prompt, when not the input's caption

    @property
    def engine_task(self) -> str:
        return BENCH_CASES[self.task][0].name

    def spec(self, **fields):
        """The case as an EditSpec; `fields` adds the run's options (preset, seed, max_resolution, ...)."""
        from ..spec import EditSpec

        return EditSpec(task=self.engine_task, image=self.scene.image,
                        prompt=self.prompt or self.scene.caption, **self.kwargs, **fields)


def make_case(task: str, k: int) -> Case:
    """Case k of a benchmark case name; retries seeds until the geometry fits (deterministic)."""
    declared = BENCH_CASES[task][1]
    for attempt in range(1000):
        seed = CASE_SEED_BASE + declared.seed_offset + k * 1000 + attempt
        rng = np.random.default_rng(seed)
        scene = random_scene(seed)
        if not scene.shapes:
            continue
        fields = declared.make(seed, rng, scene)
        if fields is not None:
            return Case(task, seed, scene, **fields)
    raise RuntimeError(f"no valid {task} case for k={k}")
