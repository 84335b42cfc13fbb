"""Ray actors, one per tower: each loads only its own tower's tensors onto its own device and wraps a
runner (runners.py). The context worker's `take_delta` is called with a tensor transport (nccl between
GPUs, gloo on CPU) so the state delta moves actor to actor without the object store."""

from __future__ import annotations

import os
import time
from collections import deque

import torch

from twotower.cluster.engine.denoiser_runner import DenoiserRunner
from twotower.cluster.engine.loading import resolve_dtype
from twotower.cluster.engine.runners import ContextRunner, PoolLimits
from twotower.cluster.engine.steps import warm_up
from twotower.towers.checkpoint import load_tower


def _device(requested: str) -> str:
    # under Ray with num_gpus=1 the actor sees exactly one GPU, as cuda:0
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def _threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(n)


class _Worker:
    role = ""

    def ping(self) -> dict:
        """Health check and identity."""
        return {"role": self.role, "pid": os.getpid(), "device": str(self.device),
                "params": sum(p.numel() for p in self.runner.tower.parameters())}  # fmt: skip

    def warm_up(self, block_sizes: list[int]) -> float:
        """Compile (and on CUDA capture) this tower's start-up steps; progress goes to the actor's log."""
        return warm_up([self.runner], block_sizes)

    def op_spans(self, reset: bool = True) -> list[tuple[str, float, float]]:
        """Busy intervals recorded since the last call (time.perf_counter, shared by processes of one host)."""
        spans = list(self.runner.times.spans)
        if reset:
            self.runner.times.spans.clear()
        return spans

    def record_spans(self, on: bool) -> None:
        self.runner.times.keep = on
        self.runner.times.spans.clear()


class ContextTowerWorker(_Worker):
    role = "context"

    def __init__(self, model: str, device: str = "auto", dtype: str | None = None,
                 limits: PoolLimits | None = None, compile: bool = False,
                 threads: int | None = None) -> None:  # fmt: skip
        _threads(threads)
        self.device = _device(device)
        self.runner = ContextRunner(load_tower(model, "context", self.device, resolve_dtype(self.device, dtype)),
                                    limits, compile)  # fmt: skip

    def add_rows(self, lane, prompts, sampling, mirror):
        return self.runner.add_rows(lane, prompts, sampling, mirror)

    def keep_rows(self, lane, rows):
        self.runner.keep_rows(lane, rows)

    def decode(self, lane, ids, sampling):
        return self.runner.decode(lane, ids, sampling)

    def extend(self, lane, ids, n_valid):
        self.runner.extend(lane, ids, n_valid)

    def verify(self, lane, ids, n_valid):
        return self.runner.verify(lane, ids, n_valid)

    def rewind(self, lane, keep):
        self.runner.rewind(lane, keep)

    def take_delta(self, lane):
        delta = self.runner.take_delta(lane)
        delta["sent_at"] = torch.tensor(time.perf_counter(), dtype=torch.float64, device=delta["since"].device)
        return delta

    def close_lane(self, lane):
        self.runner.close_lane(lane)

    def score(self, prompt, continuation, top=0, echo=False):
        return self.runner.score(prompt, continuation, top, echo)

    def cache_stats(self):
        return self.runner.cache_stats()


class DenoiserTowerWorker(_Worker):
    role = "denoiser"

    def __init__(self, model: str, device: str = "auto", dtype: str | None = None,
                 limits: PoolLimits | None = None, compile: bool = False,
                 threads: int | None = None) -> None:  # fmt: skip
        _threads(threads)
        self.device = _device(device)
        tower = load_tower(model, "denoiser", self.device, resolve_dtype(self.device, dtype))
        self.runner = DenoiserRunner(tower, limits=limits, compile=compile)  # a mirror pool of the same size
        # (bytes, seconds from send to receipt) per delta since the last take_transfers; bounded, since
        # only benchmarks drain it and a serving replica lives for days
        self.transfers: deque[tuple[int, float]] = deque(maxlen=4096)

    def apply_delta(self, lane, delta) -> tuple[int, float]:
        """Returns (bytes received, seconds from the context actor's hand-off to receipt)."""
        received = time.perf_counter()
        sent_at = float(delta.pop("sent_at"))
        n = self.runner.apply_delta(lane, delta)
        self.transfers.append((n, received - sent_at))
        return n, received - sent_at

    def denoise(self, lane, xt, t, mask_id, temperature, seeds):
        return self.runner.denoise(lane, xt, t, mask_id, temperature, seeds)

    def mock_ar(self, lane, ids, sampling):
        return self.runner.mock_ar(lane, ids, sampling)

    def keep_rows(self, lane, rows):
        self.runner.keep_rows(lane, rows)

    def close_lane(self, lane):
        self.runner.close_lane(lane)

    def take_transfers(self) -> list[tuple[int, float]]:
        out = list(self.transfers)
        self.transfers.clear()
        return out
