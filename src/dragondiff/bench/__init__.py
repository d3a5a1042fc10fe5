"""Benchmark commands: they print and save numbers (JSON + Markdown); tests never assert timings."""
