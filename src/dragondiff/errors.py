"""Errors the engine raises that callers may want to catch by type."""


class NonFiniteError(RuntimeError):
    """NaN or Inf appeared in a latent or an image."""


class InputNote(UserWarning):
    """An input was accepted after a conversion the user should know about (e.g. transparency flattened)."""


class PerformanceNote(UserWarning):
    """A setting was accepted that is known to run much slower here than an alternative (e.g. bf16 on a CPU
    without native bf16 instructions)."""
