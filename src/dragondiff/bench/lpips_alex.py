"""LPIPS with AlexNet (Zhang et al., CVPR 2018, "v0.1"): the perceptual distance DragBench's Image Fidelity uses.

Written here rather than taken from the `lpips` package because that package needs torchvision, whose wheels pin
another torch. The network is AlexNet's convolutional trunk (torchvision's layout, taps after its five ReLUs), each
tap unit-normalised over channels, the squared difference weighted per channel by LPIPS' learned 1x1 layers,
averaged over space and summed over taps. Inputs are RGB in [-1, 1], shifted and scaled as LPIPS v0.1 does.

Weights are never downloaded: `load_lpips(path)` reads
  * a folder holding torchvision's AlexNet checkpoint (`alexnet-owt-7be5be79.pth`, any `alexnet*.pth`) and LPIPS'
    linear layers (`alex.pth` from the `lpips` package's `weights/v0.1/`), or
  * one `.safetensors` file with both sets of keys (`features.N.*` and `linK.model.1.weight`),
  * or, with no path, those two files where torch's hub cache and an installed `lpips` package keep them.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ALEX_CHANNELS = (64, 192, 384, 256, 256)
# LPIPS v0.1's input scaling layer (per-channel shift and scale of inputs in [-1, 1]).
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
# Indices of torchvision's alexnet.features: conv layers, and the ReLUs whose outputs LPIPS compares.
CONV_INDICES = (0, 3, 6, 8, 10)
TAP_INDICES = (1, 4, 7, 9, 11)
TORCHVISION_FILE = "alexnet-owt-7be5be79.pth"
LINEAR_FILE = "alex.pth"


def _alexnet_trunk(channels: tuple[int, ...]) -> nn.Sequential:
    """torchvision's alexnet.features[:12] with the given widths (the real ones: ALEX_CHANNELS)."""
    c1, c2, c3, c4, c5 = channels
    return nn.Sequential(
        nn.Conv2d(3, c1, 11, stride=4, padding=2), nn.ReLU(),
        nn.MaxPool2d(3, stride=2),
        nn.Conv2d(c1, c2, 5, padding=2), nn.ReLU(),
        nn.MaxPool2d(3, stride=2),
        nn.Conv2d(c2, c3, 3, padding=1), nn.ReLU(),
        nn.Conv2d(c3, c4, 3, padding=1), nn.ReLU(),
        nn.Conv2d(c4, c5, 3, padding=1), nn.ReLU(),
    )


class AlexLPIPS(nn.Module):
    """LPIPS(alex) distance of image pairs: forward(a, b) with (N, 3, H, W) in [-1, 1] -> (N,) distances."""

    def __init__(self, channels: tuple[int, ...] = ALEX_CHANNELS):
        super().__init__()
        self.features = _alexnet_trunk(channels)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in channels)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1))
        self.eval().requires_grad_(False)

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        x = (x - self.shift) / self.scale
        for k, layer in enumerate(self.features):
            x = layer(x)
            if k in TAP_INDICES:
                out.append(x)
        return out

    @torch.no_grad()
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        total = 0
        for fa, fb, lin in zip(self.taps(a), self.taps(b), self.lins):
            fa = fa / (fa.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            fb = fb / (fb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + lin((fa - fb) ** 2).mean(dim=(2, 3))
        return total.flatten()


def _read(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)  # tensors only: nothing in the file runs


def convert_state(state: dict, source: str) -> dict:
    """torchvision / lpips key names -> this module's; errors name what is missing."""
    out = {}
    for n, index in enumerate(CONV_INDICES):
        for kind in ("weight", "bias"):
            key = f"features.{index}.{kind}"
            if key in state:
                out[key] = state[key]
        lin = state.get(f"lin{n}.model.1.weight", state.get(f"lins.{n}.weight"))
        if lin is not None:
            out[f"lins.{n}.weight"] = lin
    return out


def _default_files() -> list[Path]:
    """Where torch's hub cache and an installed `lpips` package keep the two files (found without importing)."""
    hub = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch")) / "hub" / "checkpoints"
    files = [hub / TORCHVISION_FILE]
    spec = importlib.util.find_spec("lpips")
    if spec is not None and spec.origin:
        files.append(Path(spec.origin).parent / "weights" / "v0.1" / LINEAR_FILE)
    return files


def load_lpips(path: str | Path | None = None, device="cpu") -> AlexLPIPS:
    """The LPIPS(alex) network with its published weights, from `path` (see the module doc)."""
    if path is None:
        files = [f for f in _default_files() if f.is_file()]
        where = "torch's hub cache and the lpips package"
    else:
        path = Path(path)
        if path.is_dir():
            files = sorted(path.glob("alexnet*.pth")) + sorted(path.glob("*.safetensors")) + \
                [f for f in [path / LINEAR_FILE] if f.is_file()]
        elif path.is_file():
            files = [path]
        else:
            raise FileNotFoundError(f"--lpips {path}: no such file or folder")
        where = str(path)
    state: dict = {}
    for f in files:
        try:
            state.update(convert_state(_read(f), str(f)))
        except Exception as e:  # noqa: BLE001 (a corrupt or foreign file: say which)
            raise ValueError(f"--lpips: cannot read {f} ({type(e).__name__}: {e})") from e
    model = AlexLPIPS()
    missing = sorted(set(model.state_dict()) - {"shift", "scale"} - set(state))
    if missing:
        raise FileNotFoundError(
            f"--lpips: no LPIPS(alex) weights in {where} (missing {', '.join(missing[:4])}"
            f"{', ...' if len(missing) > 4 else ''}). Give a folder holding torchvision's {TORCHVISION_FILE} "
            f"(https://download.pytorch.org/models/{TORCHVISION_FILE}) and the lpips package's weights/v0.1/"
            f"{LINEAR_FILE}, or one .safetensors with both")
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise ValueError(f"--lpips {where}: weights of the wrong shape for LPIPS(alex) ({e})") from e
    return model.to(device)


def lpips_distance(model: AlexLPIPS, a: torch.Tensor, b: torch.Tensor, size: int | None = 224) -> float:
    """DragBench's LPIPS of two (1, 3, H, W) images in [-1, 1]: both bilinearly resized to size x size first
    (DragDiffusion's run_eval_similarity.py uses 224)."""
    if size is not None:
        a = F.interpolate(a, (size, size), mode="bilinear")
        b = F.interpolate(b, (size, size), mode="bilinear")
    p = next(model.parameters())
    return float(model(a.to(p.device, p.dtype), b.to(p.device, p.dtype))[0])
