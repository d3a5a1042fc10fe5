"""Guidance features on the feature grid: the backbone's native feature maps (for SD1.x the outputs of
up_blocks[1] and [2]) nearest-resized to the grid every energy compares features on (`Grid.feature_hw`).
The feature pass itself is the backbone's (`backbone.features`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def resize_features(native: list[torch.Tensor], size_hw: tuple[int, int]) -> list[torch.Tensor]:
    """Nearest-resize native features to size_hw, in fp32 (fp16 cosines underflow).

    With the edit's feature grid this gives the maps all energies use; the move task also builds a scaled copy of
    the reference features from the native maps (`Grid.scaled_feature_hw`; nearest twice is not nearest once).
    """
    return [F.interpolate(f.float(), size=tuple(size_hw), mode="nearest") for f in native]
