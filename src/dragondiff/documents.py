"""Spec files and sidecars as data: JSON or YAML text, bounded before anything validates it.

A spec file is user input like an image: a few kilobytes of YAML can name gigabytes (nine nested anchors of nine
aliases each, "billion laughs", expand to 387 million values once a validator walks them). So a document is
refused by name when its file is larger than SPEC_FILE_BYTES, nests deeper than SPEC_DEPTH, or holds more than
SPEC_VALUES values counted as a reader would see them (every alias expanded), and the count stops at the bound.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

# A spec with a thousand edits is a few hundred kB; sidecars are about 2 kB.
SPEC_FILE_BYTES = 4 * 2**20
SPEC_DEPTH = 32
SPEC_VALUES = 200_000
YAML_SUFFIXES = (".yaml", ".yml")


def is_yaml(path: Path) -> bool:
    return Path(path).suffix.lower() in YAML_SUFFIXES


def read_text(path: Path, label: str | None = None) -> str:
    """The file's text, read once (a pipe or /dev/stdin cannot be read twice), at most SPEC_FILE_BYTES."""
    label = label or str(path)
    try:
        with open(path, "rb") as f:
            data = f.read(SPEC_FILE_BYTES + 1)
    except OSError as e:
        raise ValueError(f"{label}: cannot read ({e.strerror or e})") from e
    if len(data) > SPEC_FILE_BYTES:
        raise ValueError(f"{label}: larger than {SPEC_FILE_BYTES // 2**20} MiB; a spec file is at most that "
                         "(split the edits over several files)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{label}: not UTF-8 text (byte {e.start}); spec files are JSON or YAML text") from e


def parse(text: str, yaml: bool, label: str):
    """JSON (or YAML with `yaml`) text as data, then `check_bounds`. Errors are ValueErrors naming `label`."""
    try:
        if yaml:
            import yaml as pyyaml

            data = pyyaml.safe_load(text)
        else:
            data = json.loads(text)
    except RecursionError as e:
        raise ValueError(f"{label}: nested deeper than {SPEC_DEPTH} levels; at most that is allowed") from e
    except Exception as e:  # noqa: BLE001 (json and yaml raise their own errors; both mean the same here)
        what = "YAML" if yaml else "JSON"
        raise ValueError(f"{label}: not valid {what} ({str(e)[:300]})") from e
    check_bounds(data, label)
    return data


def check_bounds(data, label: str) -> None:
    """Refuse data nested deeper than SPEC_DEPTH or holding more than SPEC_VALUES values (aliases expanded: a
    list that appears twice counts twice). Stops counting at the bound, so the check itself is cheap."""
    count = 0
    stack = [(data, 0)]
    while stack:
        value, depth = stack.pop()
        count += 1
        if count > SPEC_VALUES:
            raise ValueError(f"{label}: holds more than {SPEC_VALUES:,} values (YAML aliases counted as often as "
                             "they are used); at most that many are allowed")
        if depth > SPEC_DEPTH:
            raise ValueError(f"{label}: nested deeper than {SPEC_DEPTH} levels; at most that is allowed")
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
            stack.extend((k, depth + 1) for k in value)
        elif isinstance(value, (list, tuple)):
            stack.extend((v, depth + 1) for v in value)


def read(path: Path, label: str | None = None):
    """A spec file or sidecar as bounded data (YAML for .yaml/.yml, else JSON)."""
    label = label or str(path)
    return parse(read_text(path, label), is_yaml(path), label)


def base_folder(path: Path) -> Path:
    """The folder relative paths in a spec file are taken from: the real file's folder (a symlinked spec's target
    sits beside its images), or the working folder for a stream such as /dev/stdin or a pipe."""
    try:
        if stat.S_ISREG(os.stat(path).st_mode):
            return Path(path).resolve().parent
    except OSError:
        pass
    return Path.cwd()
