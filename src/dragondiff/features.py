"""The feature pass ("estimator" of the official code): outputs of up_blocks[1] and up_blocks[2] (after their
upsamplers), nearest-resized to H/4 x W/4, the grid every energy
compares features on.

It runs the same UNet as the sampler, with the bank processors in plain mode, and stops right after
up_blocks[2] through a forward hook that raises: up_blocks[3], norm_out and conv_out are never computed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FEATURE_BLOCKS = (1, 2)  # official up_ft_index
UP_SCALE = 2  # features are resized to 2x the last feature's resolution (= latent res), i.e. H/4


class _StopForward(Exception):
    pass


def extract_features(unet, latent: torch.Tensor, timestep, context: torch.Tensor) -> list[torch.Tensor]:
    """Return [f0, f1] at their native resolutions (latent/2, latent). Differentiable when grad is enabled."""
    captured: dict[int, torch.Tensor] = {}
    last = max(FEATURE_BLOCKS)

    def make_hook(index):
        def hook(_module, _inputs, output):
            captured[index] = output
            if index == last:
                raise _StopForward

        return hook

    handles = [unet.up_blocks[i].register_forward_hook(make_hook(i)) for i in FEATURE_BLOCKS]
    try:
        unet(latent.to(unet.dtype), timestep, encoder_hidden_states=context.to(unet.dtype), return_dict=False)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    if last not in captured:
        raise RuntimeError("feature pass: up_blocks[2] was never reached")
    return [captured[i] for i in FEATURE_BLOCKS]


def resize_features(native: list[torch.Tensor], scale: float = 1.0) -> list[torch.Tensor]:
    """Nearest-resize native features to int(h_last·scale·2) x int(w_last·scale·2), in fp32.

    scale = 1 gives the H/4 feature grid all energies use; the move task also builds an rs-scaled copy of the
    reference features from the native maps (not from the H/4 grid: nearest twice is not nearest once).
    Energies are computed in fp32 whatever the model dtype (fp16 cosines underflow).
    """
    h, w = native[-1].shape[-2:]
    size = (int(h * scale * UP_SCALE), int(w * scale * UP_SCALE))
    return [F.interpolate(f.float(), size=size, mode="nearest") for f in native]
