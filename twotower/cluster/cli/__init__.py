"""The `twotower` command line (main.py) and the tools it runs: `eval` (evaluation.py) and
`bench-serve` (bench_serve.py). The top layer: it may import every other part of the cluster."""

from .main import main

__all__ = ["main"]
