"""Static-shape tower steps: batches padded to a bucket, attention windows rounded up to a bucket, and one
graph per (step kind, batch bucket, window bucket, block length).

A step function (the runners define them over their tower and state pool) has shapes that depend only on
its key, and reads no value back to the host; so `torch.compile(fullgraph=True, dynamic=False)` turns it
into one graph. `StepRunner` keeps those graphs: each key is compiled the first time it is used and never
again. Each key gets its own copy of the step function's code object, so TorchDynamo keeps one cache entry
per key instead of piling every shape onto one function as recompilations.

On CUDA each key's step is also captured as a CUDA graph (`CapturedStep`): its tensor arguments are copied
into the graph's static input buffers and the whole step replays as one launch. Capture runs the step on
the pool's scratch slot (the runner supplies those arguments), never on a real sequence, since warming a
step up before capture executes it.

Padding rows of a batch point at the pool's scratch slot, read nothing real and write only there.
"""

from __future__ import annotations

import logging
import sys
import time
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor

log = logging.getLogger(__name__)

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


def batch_buckets(max_batch: int) -> list[int]:
    """Every bucket a batch of 1..max_batch rows lands in."""
    return sorted({batch_bucket(n, max_batch) for n in range(1, max_batch + 1)})


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


class CapturedStep:
    """One step as a CUDA graph. Outputs are the graph's static buffers: a caller keeps what it needs
    (a clone) before the next replay of the same key."""

    def __init__(self, fn: Callable, scratch_args: tuple, pool) -> None:
        self.inputs = [a.clone() if isinstance(a, Tensor) else a for a in scratch_args]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up (compiles, autotunes) outside the capture
            for _ in range(2):
                fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.outputs = fn(*self.inputs)

    def __call__(self, *args):
        for buf, a in zip(self.inputs, args, strict=True):
            if isinstance(buf, Tensor):
                buf.copy_(a, non_blocking=True)
        self.graph.replay()
        return self.outputs


class StepRunner:
    """Runs step functions eagerly, or through one compiled graph per key (captured on CUDA).

    compile: False (eager), True (TorchInductor), or the name of a torch.compile backend. "eager" captures
    the same full graphs in seconds instead of a minute but runs them op by op: tests use it to check
    that every step traces to one graph without recompiling, which is what CUDA-graph capture needs.
    capture: record each compiled step as a CUDA graph (default: on CUDA devices)."""

    def __init__(self, compile: bool | str, device: torch.device | str = "cpu", capture: bool | None = None) -> None:
        self.compile = compile
        self.backend = "inductor" if compile is True else compile
        self.device = torch.device(device)
        self.capture = bool(compile) and (self.device.type == "cuda" if capture is None else capture)
        self.graphs: dict[tuple, Callable] = {}
        self.stats = StepStats()
        self._mempool = torch.cuda.graph_pool_handle() if self.capture else None

    def run(self, key: tuple, fn: Callable, *args, scratch: Callable[[], tuple] | None = None):
        """fn(*args) for the step `key` = (kind, batch bucket, window, ...): every call with one key must
        pass tensors of one shape (that is what the key says). `scratch`: arguments of the same shapes
        that touch only the scratch slot (needed to capture a key the first time it is used)."""
        self.stats.calls += 1
        if not self.compile:
            return fn(*args)
        graph = self.graphs.get(key)
        if graph is None:
            t0 = time.perf_counter()
            graph = self._build(key, fn, scratch() if scratch is not None else None)
            out = graph(*args)
            self.stats.compiled[key] = time.perf_counter() - t0
            return out
        return graph(*args)

    def _build(self, key: tuple, fn: Callable, scratch_args: tuple | None) -> Callable:
        compiled = torch.compile(_fresh(fn, key), fullgraph=True, dynamic=False, backend=self.backend)
        if self.capture:
            if scratch_args is None:
                raise ValueError(f"step {key}: capturing a CUDA graph needs scratch-slot arguments")
            try:
                graph = CapturedStep(compiled, scratch_args, self._mempool)
            except Exception as e:  # a kernel Dynamo cannot trace: capture the eager step instead
                log.warning("step %s: compiled capture failed (%s: %s); capturing the eager step", key,
                            type(e).__name__, e)  # fmt: skip
                graph = CapturedStep(fn, scratch_args, self._mempool)
        else:
            graph = compiled
        self.graphs[key] = graph
        return graph

    def warm(self, key: tuple, fn: Callable, scratch: Callable[[], tuple]) -> None:
        """Compile (and capture) `key` now, running it only on the scratch slot."""
        if self.compile and key not in self.graphs:
            self.run(key, fn, *scratch(), scratch=scratch)


class Progress:
    """A one-line progress bar on stderr (a line per item when stderr is not a terminal, e.g. a log)."""

    def __init__(self, total: int, label: str, stream=None) -> None:
        self.total, self.label, self.done = total, label, 0
        self.stream = stream or sys.stderr
        self.t0 = time.perf_counter()
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def step(self, what: str) -> None:
        self.done += 1
        secs = time.perf_counter() - self.t0
        bar = "#" * (20 * self.done // max(self.total, 1))
        line = f"{self.label} [{bar:<20}] {self.done}/{self.total} {what} ({secs:.1f} s)"
        self.stream.write(("\r" + line + ("\n" if self.done == self.total else "")) if self.tty else line + "\n")
        self.stream.flush()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


def warm_up(runners: Iterable, block_sizes: Iterable[int], stream=None) -> float:
    """Compile (and on CUDA capture) every runner's start-up step set; returns the seconds it took."""
    plans = [(r, k, fn, scratch) for r in runners for k, fn, scratch in r.warmup_plan(sorted(set(block_sizes)))]
    todo = [p for p in plans if p[0].steps.compile and p[1] not in p[0].steps.graphs]
    if not todo:
        return 0.0
    bar = Progress(len(todo), "compiling tower steps", stream)
    with torch.no_grad():
        for runner, key, fn, scratch in todo:
            runner.steps.warm(key, fn, scratch)
            bar.step(" ".join(str(k) for k in key))
    log.info("compiled %d tower steps in %.1f s", len(todo), bar.elapsed())
    return bar.elapsed()


def _fresh(fn: Callable, key: tuple) -> Callable:
    """A copy of `fn` with a code object of its own (TorchDynamo caches compiled frames per code object)."""
    name = "step_" + "_".join(str(k) for k in key)
    code = fn.__code__.replace(co_name=name, co_qualname=name) if hasattr(fn.__code__, "co_qualname") else \
        fn.__code__.replace(co_name=name)  # fmt: skip
    out = types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)
    out.__kwdefaults__ = fn.__kwdefaults__
    return out
