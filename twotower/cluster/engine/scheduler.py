"""Admission and lane selection. Plain Python over plain data: no torch, no tower state.

Requests wait in FIFO order until a slot is free (at most `max_num_seqs` run at once). Running requests
are grouped into lanes by decoding mode (and block size for the block modes): rows of one lane share
one batched forward per step. With `micro_batches` > 1 each group is spread over that many lanes
(`diffusion/S16#0`, `#1`, ...; a newcomer joins the smallest), so that with two towers on two devices
one micro-batch's context-tower work overlaps another's denoiser forward. Each engine step admits what
fits, then steps every non-empty lane once.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .request import FinishReason, Request, Status


def lane_key(req: Request) -> str:
    """The lane group of a request (before the micro-batch suffix)."""
    p = req.params
    return f"{p.mode}/S{p.block_size}" if p.mode in ("diffusion", "lossless") else p.mode


def parse_lane(key: str) -> tuple[str, int | None]:
    """'diffusion/S16#1' -> ('diffusion', 16); 'ar#0' -> ('ar', None)."""
    group = key.split("#", 1)[0]
    mode, _, size = group.partition("/S")
    return mode, int(size) if size else None


@dataclass
class SchedulerOutput:
    admit: dict[str, list[Request]] = field(default_factory=dict)  # lane -> requests to prefill now
    step: list[str] = field(default_factory=list)  # lanes to step, in order


class Scheduler:
    def __init__(self, max_num_seqs: int, max_prefills_per_step: int = 16, micro_batches: int = 1) -> None:
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs: must be >= 1 (got {max_num_seqs})")
        if micro_batches < 1:
            raise ValueError(f"micro_batches: must be >= 1 (got {micro_batches})")
        self.micro_batches = micro_batches
        self.max_num_seqs = max_num_seqs
        self.max_prefills_per_step = max_prefills_per_step
        self.waiting: deque[Request] = deque()
        self.running: dict[str, Request] = {}

    def add(self, req: Request) -> None:
        if req.request_id in self.running or any(w.request_id == req.request_id for w in self.waiting):
            raise ValueError(f"request_id: {req.request_id!r} is already in flight")
        self.waiting.append(req)

    def abort(self, request_id: str) -> Request | None:
        """Finish a request as aborted; its slot counts as free at once. None if unknown."""
        for w in self.waiting:
            if w.request_id == request_id:
                self.waiting.remove(w)
                w.finish(FinishReason.ABORT)
                return w
        req = self.running.pop(request_id, None)
        if req is not None:
            if not req.finished:
                req.finish(FinishReason.ABORT)
        return req

    def schedule(self, lane_sizes: dict[str, int]) -> SchedulerOutput:
        out = SchedulerOutput()
        sizes = dict(lane_sizes)
        admitted = 0
        while self.waiting and len(self.running) < self.max_num_seqs and admitted < self.max_prefills_per_step:
            req = self.waiting.popleft()
            group = lane_key(req)
            key = min((f"{group}#{i}" for i in range(self.micro_batches)), key=lambda k: sizes.get(k, 0))
            sizes[key] = sizes.get(key, 0) + 1
            req.status = Status.RUNNING
            self.running[req.request_id] = req
            out.admit.setdefault(key, []).append(req)
            admitted += 1
        out.step = [k for k, n in lane_sizes.items() if n > 0]
        return out

    def release(self, reqs: list[Request]) -> None:
        """Forget finished requests."""
        for r in reqs:
            self.running.pop(r.request_id, None)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)
