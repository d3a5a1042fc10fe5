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
    ("leaves", {"errors", "validate", "limits", "weights", "grid", "presets", "steps", "result", "documents", "shapes",
                "shapes.scenes", "shapes.metrics", "shapes.tokenizer", "shapes.model"}),
    ("model and inputs", {"attention", "features", "energies", "inputs", "inversion", "backbone", "backbone_sdxl",
                          "backbone_sd3", "backbone_flux", "compile", "image_prompt", "face"}),
    ("engine", {"sampler"}),
    ("tasks and description", {"tasks", "tasks.base", "tasks.move", "tasks.drag", "tasks.appearance", "tasks.paste",
                               "tasks.face", "spec", "planning"}),
    ("facade", {"pipeline", "loading", "lora", "dragondiff"}),
    ("delivery", {"output", "provenance", "dragbench", "tiny", "tiny_sd3", "tiny_flux"}),
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


# The backbone family: the modules that know a network's insides. The trainer, the DIFT metric (its own UNet) and
# the tiny-model builders build or read a UNet on purpose.
BACKBONE_FAMILY = ("backbone", "tiny", "train", "bench.dift", "shapes")


def test_no_unet_names_outside_the_backbone_family():
    """Outside the backbone family nothing names a UNet's insides (`up_blocks`, `attn1`/`attn2` layers) or reaches
    for a backbone's `.unet`: the sampler, the bank, the image prompt, the tasks and the edges see the backbone
    contract (`denoiser`, `predict`, `features`, `bank_layers`, ...), so a transformer family fits beside it."""
    found = []
    for path, name in _modules():
        if name.startswith(BACKBONE_FAMILY):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "up_blocks":
                found.append(f"{name}:{node.lineno} .up_blocks")
            elif isinstance(node, ast.Attribute) and node.attr == "unet":
                owner = node.value.attr if isinstance(node.value, ast.Attribute) else getattr(node.value, "id", "")
                if owner in ("backbone", "bb"):
                    found.append(f"{name}:{node.lineno} {owner}.unet")
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and any(
                    word in node.value for word in ("up_blocks.", ".attn1", ".attn2")):
                found.append(f"{name}:{node.lineno} {node.value[:40]!r}")
    assert not found, "UNet names outside the backbone family:\n" + "\n".join(found)
