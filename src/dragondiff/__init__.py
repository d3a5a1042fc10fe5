"""dragondiff: DragonDiffusion (Mou et al., ICLR 2024) drag-style editing on stock diffusers."""

import importlib

__version__ = "0.1.0"
__all__ = ["DEFAULT_MODEL", "DragonPipeline", "EditResult", "EditSpec", "Inversion", "NonFiniteError", "OFFICIAL",
           "PAPER", "Preset"]

# The public names, imported on first use: `import dragondiff.cli` must not import torch (seconds) before the command
# line has its signal handlers in place.
_HOME = {"DEFAULT_MODEL": "pipeline", "DragonPipeline": "pipeline", "EditResult": "result", "EditSpec": "spec",
         "Inversion": "inversion", "NonFiniteError": "errors", "OFFICIAL": "presets", "PAPER": "presets",
         "Preset": "presets"}


def __getattr__(name):
    if name in _HOME:
        value = getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_HOME])
