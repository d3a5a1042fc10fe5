"""One component's weights: loaded with its loading report checked (nothing missing, unexpected, misshaped or left
on the meta device), and fingerprinted (sha256 of its files). Below the backbones, the image prompt, the loaders
and the sidecars, which all load or fingerprint weights."""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

LISTED_KEYS = 5  # keys named in a refusal; the count says how many more


def listed(keys, count: int = LISTED_KEYS) -> str:
    """The first `count` of some keys (sorted) and how many there are in all."""
    keys = sorted(keys)
    more = f", ... ({len(keys)} in all)" if len(keys) > count else ""
    return ", ".join(keys[:count]) + more


def load_component(cls, source: str, component: str, subfolder: str | None = None, **kwargs):
    """`cls.from_pretrained` of one component (diffusers or transformers), refused with the component's name and
    its first keys when its weights file lacks weights the configuration has, holds others, or leaves any
    on the meta device: neither library may fill a missing weight with random values (a re-run would differ)."""
    if subfolder is not None:
        kwargs["subfolder"] = subfolder
    model, info = cls.from_pretrained(source, output_loading_info=True, **kwargs)
    check_loading_info(model, info, component)
    return model


def check_loading_info(model, info: dict, component: str) -> None:
    """Refuse a loaded module whose loading report (diffusers' / transformers' `output_loading_info`) lists missing,
    unexpected or misshaped keys, or which still has weights on the meta device (never loaded)."""
    problems = []
    for key, what in (("missing_keys", "missing"), ("unexpected_keys", "unexpected"),
                      ("mismatched_keys", "of another shape")):
        keys = [k if isinstance(k, str) else str(k[0]) for k in info.get(key) or ()]
        if keys:
            problems.append(f"{len(keys)} {what} ({listed(keys)})")
    meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta and not problems:
        problems.append(f"{len(meta)} never loaded ({listed(meta)})")
    if problems:
        raise ValueError(f"{component}: its weights do not match its configuration: " + "; ".join(problems)
                         + "; refused rather than filled with random values")


@lru_cache(maxsize=8)
def _hash_files(paths: tuple[str, ...], stamp: tuple) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).name.encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def file_hash(paths: list[Path]) -> str:
    """sha256 over the files' names and bytes (cached per size and mtime: hashing a 4 GB checkpoint takes a while)."""
    paths = sorted(str(p) for p in paths)
    stamp = tuple((os.path.getsize(p), os.path.getmtime(p)) for p in paths)
    return _hash_files(tuple(paths), stamp)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json")


def folder_hash(folder: Path) -> str:
    """sha256 of a model folder's weight and config files: the same value in `info` and in sidecars."""
    return file_hash(sorted(p for p in Path(folder).rglob("*") if p.suffix in WEIGHT_SUFFIXES))
