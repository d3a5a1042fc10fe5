"""Compiled UNet calls (opt-in): `torch.compile` over the UNet's repeated transformer blocks.

The eager path stays the default and the reference: the parity tests run it. What `compile_unet` changes:

- Every `BasicTransformerBlock` (diffusers' `_repeated_blocks` of the UNet: regional compilation, so a cold start
  compiles a few block graphs instead of a whole UNet) runs as generated kernels, one graph per input signature
  (`dynamic=False`: an edit's shapes are static). Resnets, resampling and our code between the blocks stay eager.
- The memory bank's exchange (`BankController.transform`: bank lookups by step, capture into the bank) runs eager
  between two graphs of a decoder block, so a new step or bank mode never recompiles a block.
- The guidance gradient w.r.t. the latent goes through AOTAutograd's compiled backward.
- Compiled code is kept across processes in torch's on-disk caches (inductor's FX graph cache and AOTAutograd's
  cache, both on by default), in `compile_cache_dir()`: a later process at the same size skips code generation
  (dynamo still traces the blocks).
- LoRA layers (peft's wrappers around `to_q` ...) are traced with their block. An unfused LoRA's scale is a Python
  float the graphs are specialised on: a new scale compiles the blocks again (a set of graphs per value, which the
  recompile limit below bounds). Fused, the wrappers call only their base layers, whose weights are graph inputs:
  the base matmul alone instead of it plus two LoRA matmuls, a scale and an add, and a scale change (re-fused
  weights) compiles nothing. `fuse_lora(permanent=True)` removes the wrappers: the graphs of a model without LoRAs.
- Recompiles are bounded and loud: past RECOMPILE_LIMIT graphs per block signature, torch would otherwise fall back
  to eager in silence; with `fail_on_recompile_limit_hit` it raises, which `CompileError` names.

CUDA graphs (`mode="reduce-overhead"`) are refused: a block graph replayed by the next block of the same shape in
one UNet forward would overwrite outputs that the skip connections still hold; capturing them needs the whole
forward as one graph.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

# Graphs per compiled block signature before torch gives up on compiling it. A UNet forward at one resolution sees
# each block width once per batch size (1: feature passes, 2: CFG, 3: some two-image passes) and per bank state.
RECOMPILE_LIMIT = 64
BACKENDS = ("inductor", "aot_eager", "eager")  # aot_eager / eager: tracing without code generation (tests, debugging)
MODES = (None, "default", "max-autotune-no-cudagraphs")


class CompileError(RuntimeError):
    """The compiled path could not run as compiled (and would otherwise have fallen back to eager)."""


@dataclass(frozen=True)
class CompileSettings:
    """How the UNet's blocks are compiled. `backend="inductor"` generates kernels (C++ on the CPU, Triton on CUDA);
    `mode` is torch.compile's (no CUDA graphs)."""

    backend: str = "inductor"
    mode: str | None = None

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"compile backend: {self.backend!r} is not one of {', '.join(BACKENDS)}")
        if self.mode not in MODES:
            allowed = ", ".join(str(m) for m in MODES)
            raise ValueError(f"compile mode: {self.mode!r} is not one of {allowed} (CUDA-graph modes are not "
                             "supported: block graphs would overwrite outputs the skip connections hold)")


def compile_cache_dir() -> Path:
    """Where torch keeps compiled code across processes: $TORCHINDUCTOR_CACHE_DIR when set, else the user's cache
    folder (~/.cache/dragondiff/torch-compile; torch's own default is in /tmp, which many systems empty at boot)."""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dragondiff" / "torch-compile"


def compiled_blocks(unet, names=None) -> list[torch.nn.Module]:
    """The network's repeated blocks: `names` (class names; a backbone's REPEATED_BLOCKS) or diffusers'
    `_repeated_blocks` (BasicTransformerBlock for SD UNets, the FLUX transformer's two block kinds)."""
    names = set(names or getattr(unet, "_repeated_blocks", None) or ())
    blocks = [m for m in unet.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"unet: {type(unet).__name__} declares no repeated blocks to compile")
    return blocks


def keep_bank_exchange_eager() -> None:
    """Exclude `BankController.transform` (bank lookups by step, capture into the bank) from tracing, once per
    process: a decoder block is then two graphs around it, and neither a new step nor a bank mode recompiles."""
    from .attention import BankController

    if not getattr(BankController.transform, "_dragondiff_eager", False):
        eager = torch.compiler.disable(BankController.transform)
        eager._dragondiff_eager = True
        BankController.transform = eager


def compile_unet(unet, settings: CompileSettings, names=None) -> int:
    """Compile the UNet's repeated blocks in place (their next call compiles); returns how many."""
    import torch._dynamo
    import torch._functorch.config

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    # The two energy gradients of a guided step go backward through one graph (retain_graph on the first), which
    # compiled backwards with donated buffers refuse.
    torch._functorch.config.donated_buffer = False
    # torch reads the variable whenever it opens its caches, so setting it before the first compile is enough.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(compile_cache_dir())
    keep_bank_exchange_eager()
    blocks = compiled_blocks(unet, names)
    options = {"backend": settings.backend, "dynamic": False, "fullgraph": False}
    if settings.mode is not None:
        options["mode"] = settings.mode
    for block in blocks:
        block.compile(**options)
    return len(blocks)


def uncompile_unet(unet, names=None) -> None:
    """Eager blocks again (the compiled code stays in torch's caches)."""
    for block in compiled_blocks(unet, names):
        block._compiled_call_impl = None


def is_compiled(unet, names=None) -> bool:
    return any(getattr(b, "_compiled_call_impl", None) is not None for b in compiled_blocks(unet, names))


def graphs_built() -> int:
    """Graphs torch.compile has built in this process so far (each compile or recompile adds to it)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def cache_hits() -> int:
    """Compiled graphs loaded from the on-disk caches in this process so far (inductor's FX graphs and AOTAutograd's
    joint graphs), instead of being generated."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["fxgraph_cache_hit"]) + int(counters["aot_autograd"]["autograd_cache_hit"])


def explain_failure(error: BaseException) -> CompileError | None:
    """A CompileError naming what happened when `error` is torch giving up on compiling; None otherwise."""
    text = f"{type(error).__name__}: {error}"
    if "recompile" in text.lower() or "cache_size_limit" in text or "FailOnRecompileLimitHit" in text:
        import torch._dynamo

        limit = torch._dynamo.config.recompile_limit
        return CompileError(f"compiled UNet: torch recompiled a block more than {limit} times (new "
                            f"shapes or dtypes at every call, or new scales of unfused LoRAs?) and would have "
                            f"fallen back to eager; run without --compile, keep one working size per process, or "
                            f"fuse_lora before trying LoRA scales ({text[:300]})")
    return None
