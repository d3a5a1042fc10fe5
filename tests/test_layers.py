"""No module imports from a layer above its own (docs/architecture.md), lazy imports inside functions included.

Every module of the package must be placed in LAYERS: a new module fails this test until it is given a layer.
"""

import ast
from pathlib import Path

import dragondiff

ROOT = Path(dragondiff.__file__).parent

# Bottom to top; a module may import its own layer and those below. Within the top layer only the listed
# directions are allowed: the CLI fronts everything; the web UI, the benchmarks and the trainer stay apart.
LAYERS = [
    ("leaves", {"errors", "validate", "limits", "weights", "grid", "presets", "result", "documents", "shapes", "shapes.scenes",
                "shapes.metrics", "shapes.tokenizer", "shapes.model"}),
    ("model and inputs", {"attention", "features", "energies", "inputs", "inversion", "backbone", "backbone_sdxl",
                          "backbone_flux", "compile", "image_prompt", "face"}),
    ("engine", {"sampler"}),
    ("tasks and description", {"tasks", "tasks.base", "tasks.move", "tasks.drag", "tasks.appearance", "tasks.paste",
                               "tasks.face", "spec"}),
    ("facade", {"pipeline", "loading", "lora", "dragondiff"}),
    ("delivery", {"output", "provenance", "dragbench", "tiny", "tiny_flux"}),
    ("edges", {"cli", "ui", "bench", "train", "__main__"}),
]
EDGE_IMPORTS = {"cli": {"cli", "ui", "bench", "train"}, "__main__": {"cli"}, "ui": {"ui"}, "bench": {"bench"},
                "train": {"train"}}


def _modules():
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield path, ".".join(parts) or "dragondiff"


def _imports(path: Path, name: str):
    package = name.split(".") if path.name == "__init__.py" and name != "dragondiff" else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            base = package[: len(package) - (node.level - 1)]
            if node.module:
                yield ".".join(base + node.module.split("."))
            else:
                yield from (".".join(base + [a.name]) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dragondiff."):
            yield node.module.removeprefix("dragondiff.")
        elif isinstance(node, ast.Import):
            yield from (a.name.removeprefix("dragondiff.") for a in node.names if a.name.startswith("dragondiff."))


def _layer(name: str) -> int:
    for candidate in (name, name.split(".")[0]):
        for rank, (_, members) in enumerate(LAYERS):
            if candidate in members:
                return rank
    raise AssertionError(f"{name}: no layer in tests/test_layers.py LAYERS; place it (and in docs/architecture.md)")


def test_no_module_imports_from_a_layer_above():
    upward = []
    for path, name in _modules():
        if name == "dragondiff":
            continue  # the package's public names re-export the facade
        for target in _imports(path, name):
            if target in ("", "__version__") or target == "dragondiff":
                continue
            if _layer(target) > _layer(name):
                upward.append(f"{name} -> {target}")
            top = name.split(".")[0]
            if top in EDGE_IMPORTS and _layer(target) == len(LAYERS) - 1 and target.split(".")[0] not in EDGE_IMPORTS[top]:
                upward.append(f"{name} -> {target} (edges stay apart)")
    assert not upward, "imports from a layer above:\n" + "\n".join(sorted(upward))


def test_every_module_has_a_layer():
    for _, name in _modules():
        _layer(name)


def test_no_branch_on_a_task_name_outside_the_tasks():
    """Outside tasks/, no comparison and no dict key spells a task's name: the registry tells the edges what each
    task needs (adding a task is one module, one registry line and its tests)."""
    from dragondiff.tasks import TASKS

    names = set(TASKS)
    found = []
    for path, name in _modules():
        if name.startswith("tasks"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                parts = [node.left, *node.comparators]
                for part in parts:
                    items = part.elts if isinstance(part, (ast.Tuple, ast.List, ast.Set)) else [part]
                    found += [f"{name}:{node.lineno} compares with {i.value!r}" for i in items
                              if isinstance(i, ast.Constant) and i.value in names]
            elif isinstance(node, ast.Dict):
                found += [f"{name}:{node.lineno} keys a table by {k.value!r}" for k in node.keys
                          if isinstance(k, ast.Constant) and k.value in names]
    assert not found, "task names outside tasks/:\n" + "\n".join(found)
