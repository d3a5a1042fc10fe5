"""Every limit and default of the settings an edit shares across tasks, in one table.

The spec, the pipeline, a model's recommended-settings file, the CLI options and the web UI all read their ranges
and defaults from here, so a value one of them accepts is never refused by another later on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .validate import check_int, check_number, check_string

DEFAULT_PRESET = "official"
DEFAULT_SEED = 42
DEFAULT_MAX_RESOLUTION = 768  # the official demo's working resolution
BUNDLED_RESOLUTION = 128  # the bundled shapes model's scenes

# What the web UI (and its API) accepts as an uploaded image: the page checks a file before its editor reads it, the
# API before decoding it (the header gives format and size). The working size is ~max_resolution² anyway.
UPLOAD_MAX_BYTES = 20_000_000  # 20 MB
UPLOAD_MAX_PIXELS = 16_000_000  # 16 megapixels, e.g. 4000x4000 (below inputs.MAX_INPUT_PIXELS)
UPLOAD_FORMATS = {"PNG": "PNG", "JPEG": "JPEG", "WEBP": "WebP", "GIF": "GIF", "BMP": "BMP"}  # PIL name -> shown


def upload_rule() -> str:
    """What the UI accepts, as its messages say it."""
    names = list(UPLOAD_FORMATS.values())
    return (f"accepted: {', '.join(names[:-1])} or {names[-1]} images of at most {UPLOAD_MAX_BYTES / 1e6:g} MB and "
            f"{UPLOAD_MAX_PIXELS / 1e6:g} megapixels")


@dataclass(frozen=True)
class Limit:
    """An inclusive range [low, high] of one setting; `integer` settings are whole numbers."""

    low: float
    high: float
    integer: bool = False
    doc: str = ""

    def check(self, value, name: str):
        if self.integer:
            return check_int(value, name, int(self.low), int(self.high))
        return check_number(value, name, self.low, self.high)

    @property
    def text(self) -> str:
        """'1..1000' for integers, '[0, 50]' for numbers (as the error messages write them)."""
        return f"{int(self.low)}..{int(self.high)}" if self.integer else f"[{self.low:g}, {self.high:g}]"


LIMITS: dict[str, Limit] = {
    "num_inference_steps": Limit(1, 1000, integer=True, doc="DDIM steps (sampling and inversion)"),
    "guidance_scale": Limit(0, 50, doc="classifier-free guidance scale"),
    "energy_scale": Limit(0, 100, doc="guidance strength in the official demo's slider units (x1e3)"),
    "gradient_coef": Limit(0, 10, doc="factor c on the energy gradient"),
    "sde_strength": Limit(0, 1, doc="eta of the regional SDE inside the edit region"),
    "max_resolution": Limit(64, 2048, integer=True, doc="working resolution: area about N² pixels"),
    "seed": Limit(0, 2**63 - 1, integer=True, doc="seeds the regional-SDE noise"),
    "bank_step": Limit(0, 1000, integer=True, doc="a step index of a memory-bank window (50-step grid)"),
    "energy_weight": Limit(0, math.inf, doc="weight of one energy term"),
    "ip_scale": Limit(0, 2, doc="weight of the image-prompt term (official 0.1; IP-Adapter users go up to 1)"),
    # CLIP reads 77 tokens (a few hundred characters); longer prompts are cut with a warning, and past this many
    # characters refused before anything tokenises them (a 50 MB prompt took 9.9 GB to tokenise).
    "prompt_chars": Limit(0, 2000, integer=True, doc="characters of a prompt"),
}


def check_prompt(value, name: str = "prompt") -> str:
    """A text prompt: a string of at most LIMITS['prompt_chars'] characters."""
    value = check_string(value, name)
    most = int(LIMITS["prompt_chars"].high)
    if len(value) > most:
        raise ValueError(f"{name}: {len(value):,} characters; at most {most:,} are allowed (the text encoder reads "
                         "77 tokens, a few hundred characters)")
    return value


def check(name: str, value, label: str | None = None):
    """Check `value` against LIMITS[name]; the error names `label` (default: name)."""
    return LIMITS[name].check(value, label or name)
