"""The byte-level CLIP tokenizer of the bundled shapes model (also used by the tiny test models): the 256 byte
symbols, their </w> forms and the two specials, with no merges. Captions use a dozen words, so a learned
vocabulary buys nothing."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins for bytes used by GPT-2/CLIP byte-level BPE, in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    rest = [b for b in range(256) if b not in keep]
    # Printable bytes stand for themselves; the others map to 256, 257, ... The vocabulary lists them in this order.
    return [chr(b) for b in keep] + [chr(256 + n) for n in range(len(rest))]


def build_tokenizer(folder: str | Path | None = None):
    """A CLIP tokenizer over single bytes (no merges): 256 symbols, their </w> forms, and the two specials. Its
    files are written to `folder`, or to a temporary folder removed once the tokenizer has read them."""
    if folder is None:
        with tempfile.TemporaryDirectory(prefix="dragondiff-tok-") as scratch:
            return build_tokenizer(scratch)
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": 256 + i for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = 512, 513
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
