"""dragondiff: DragonDiffusion (Mou et al., ICLR 2024) drag-style editing on stock diffusers."""

from .inversion import Inversion
from .pipeline import DEFAULT_MODEL, DragonPipeline
from .presets import OFFICIAL, PAPER, Preset
from .result import EditResult
from .errors import NonFiniteError
from .spec import EditSpec

__version__ = "0.1.0"
__all__ = ["DEFAULT_MODEL", "DragonPipeline", "EditResult", "EditSpec", "Inversion", "NonFiniteError", "OFFICIAL",
           "PAPER", "Preset"]
