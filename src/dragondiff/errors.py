"""Errors the engine raises that callers may want to catch by type."""


class NonFiniteError(RuntimeError):
    """NaN or Inf appeared in a latent or an image."""
