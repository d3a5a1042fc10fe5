"""Shared fixtures: offline, tiny SD-shaped random models, small synthetic scenes."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path

import numpy as np
import pytest
import torch

DATA = Path(__file__).parent / "data"
TINY_MODEL = DATA / "tiny-model"
PARITY = DATA / "parity"

# Fast settings shared by the tests: the tiny models' 128 px scene, and a 2-step schedule where the number of
# steps does not matter (tests of mechanics that need the full schedule pass num_inference_steps themselves).
FAST = dict(max_resolution=128, num_inference_steps=2, progress=False)
FULL = dict(max_resolution=128, progress=False)  # the default 50 steps

# One intra-op thread: the tiny models gain nothing from two, and two threads under any other load on a
# 2-core machine stall in OpenMP barriers (observed: 100x slower).
torch.set_num_threads(1)


def require(what: str, modules=(), programs=()):
    """Skip a test whose optional dependencies are missing here; in CI (which installs them) fail instead."""
    import importlib.util
    import shutil

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    missing += [p for p in programs if shutil.which(p) is None]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"{what} needs {', '.join(missing)} (installed by .ci/run)")
        pytest.skip(f"needs {', '.join(missing)}")


@pytest.fixture(scope="session")
def tiny_pipe():
    """Tiny random pipeline built in memory (SD1.5 block layout), fp32 on CPU."""
    from dragondiff.tiny import build_tiny_pipeline

    return build_tiny_pipeline(seed=0, device="cpu")


@pytest.fixture(scope="session")
def parity_pipe():
    """The tiny model the official parity runs used (tests/data/tiny-model), loaded offline."""
    from dragondiff import DragonPipeline

    return DragonPipeline.from_pretrained(TINY_MODEL, local_files_only=True, device="cpu", dtype=torch.float32)


def make_scene(size=128, seed=0):
    """A smooth background with a red disc (left) and a blue square (right); returns image and both masks."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    img = np.stack([60 + 40 * xx / size, 120 + 30 * yy / size, 90 + 0 * xx], -1)
    img += rng.normal(0, 2, img.shape)
    s = size / 128
    disc = (xx - 36 * s) ** 2 + (yy - 44 * s) ** 2 <= (14 * s) ** 2
    square = (xx >= 84 * s) & (xx < 108 * s) & (yy >= 76 * s) & (yy < 100 * s)
    img[disc] = (220, 40, 40)
    img[square] = (40, 60, 220)
    return np.clip(img, 0, 255).astype(np.uint8), disc, square


@pytest.fixture
def scene():
    return make_scene()
