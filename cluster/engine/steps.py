"""Static-shape tower steps: batches padded to a bucket, attention windows rounded up to a bucket, and one
graph per (step kind, batch bucket, window bucket, block length).

A step function (the runners define them over their tower and state pool) has shapes that depend only on
its key, and reads no value back to the host; so `torch.compile(fullgraph=True, dynamic=False)` turns it
into one graph, and on CUDA that graph can be captured and replayed. `StepRunner` keeps those graphs:
each key is compiled the first time it is used and never again. Each key gets its own copy of the step
function's code object, so TorchDynamo keeps one cache entry per key instead of piling every shape onto
one function as recompilations.

Padding rows of a batch point at the pool's scratch slot, read nothing real and write only there.
"""

from __future__ import annotations

import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
MIN_WINDOW = 256  # default smallest attention window: below it the saving does not pay for another graph


def batch_bucket(n: int, max_batch: int) -> int:
    """The smallest bucket holding n rows (the largest bucket is max_batch itself)."""
    for b in BATCH_BUCKETS:
        if b >= n and b <= max_batch:
            return b
    if n > max_batch:
        raise ValueError(f"batch of {n} rows exceeds max_num_seqs {max_batch}")
    return max_batch


def window_bucket(longest: int, capacity: int, min_window: int = MIN_WINDOW) -> int:
    """Cached positions an attention step reads: the next power of two >= longest (at least min_window),
    capped at the pool capacity."""
    w = min_window
    while w < longest:
        w *= 2
    return min(w, capacity)


@dataclass
class StepStats:
    compiled: dict[tuple, float] = field(default_factory=dict)  # key -> seconds its first call took
    calls: int = 0


class StepRunner:
    """Runs step functions eagerly, or through one compiled graph per key.

    compile: False (eager), True (TorchInductor), or the name of a torch.compile backend. "eager" captures
    the same full graphs in seconds instead of a minute but runs them op by op: tests use it to check
    that every step traces to one graph without recompiling, which is what CUDA-graph capture needs."""

    def __init__(self, compile: bool | str, device: torch.device | str = "cpu") -> None:
        self.compile = compile
        self.backend = "inductor" if compile is True else compile
        self.device = torch.device(device)
        self.graphs: dict[tuple, Callable] = {}
        self.stats = StepStats()

    def run(self, key: tuple, fn: Callable, *args):
        """fn(*args) for the step `key` = (kind, batch bucket, window, ...): every call with one key must
        pass tensors of one shape (that is what the key says)."""
        self.stats.calls += 1
        if not self.compile:
            return fn(*args)
        graph = self.graphs.get(key)
        if graph is None:
            graph = torch.compile(_fresh(fn, key), fullgraph=True, dynamic=False, backend=self.backend)
            self.graphs[key] = graph
            t0 = time.perf_counter()
            out = graph(*args)
            self.stats.compiled[key] = time.perf_counter() - t0
            return out
        return graph(*args)


def _fresh(fn: Callable, key: tuple) -> Callable:
    """A copy of `fn` with a code object of its own (TorchDynamo caches compiled frames per code object)."""
    name = "step_" + "_".join(str(k) for k in key)
    code = fn.__code__.replace(co_name=name, co_qualname=name) if hasattr(fn.__code__, "co_qualname") else \
        fn.__code__.replace(co_name=name)  # fmt: skip
    out = types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)
    out.__kwdefaults__ = fn.__kwdefaults__
    return out
