"""asyncio front of an Engine: one background loop steps the engine in a worker thread, and one queue
per request carries its deltas (or the error that ended it) to the request's consumer."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import AsyncIterator, Callable

from .engine import Engine
from .errors import TowersUnavailable, wrap_step_error
from .params import SamplingParams
from .request import FinishReason, RequestOutput, Resume, Usage


class AsyncEngine:
    """asyncio front of an Engine: `generate` yields RequestOutput deltas; cancelling the consumer
    (or calling `abort`) frees the request's slot at once."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.queues: dict[str, asyncio.Queue] = {}
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self.dead: BaseException | None = None
        self.on_dead: list[Callable[[BaseException], None]] = []  # called once, when the towers are gone

    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            # The loop serves every request, so it must not run in the context of the request that
            # happened to start it: under Ray that context makes its tower calls children of that
            # request's task, and cancelling the request would cancel them. A task copies the current
            # context when created, so create it inside an empty one.
            loop = asyncio.get_running_loop()
            self._loop_task = contextvars.Context().run(loop.create_task, self._run())

    async def _run(self) -> None:
        while True:
            if not self.engine.has_unfinished():
                self.engine.report_idle()
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                outs = await asyncio.to_thread(self.engine.step)
            except Exception as e:  # fail every request in flight with the error, keep serving
                if isinstance(e, TowersUnavailable) and self.dead is None:  # only a dead tower is fatal
                    self.dead = e
                    for hook in self.on_dead:
                        hook(e)
                for r in self.engine.fail_all(e):
                    q = self.queues.get(r.request_id)
                    if q is not None:
                        q.put_nowait(e)
                continue
            for r, err in self.engine.take_failures():  # one lane failed; the others' outputs follow
                q = self.queues.get(r.request_id)
                if q is not None:
                    q.put_nowait(err)
            for o in outs:
                q = self.queues.get(o.request_id)
                if q is not None:
                    q.put_nowait(o)

    async def generate(
        self, prompt: str | list[int], params: SamplingParams | None = None, request_id: str | None = None,
        resume: Resume | None = None,
    ) -> AsyncIterator[RequestOutput]:  # fmt: skip
        if self.dead is not None:  # a dead engine admits nothing; the caller may retry elsewhere
            raise TowersUnavailable(f"this replica's towers are gone ({type(self.dead).__name__}); retry")
        req = self.engine.add_request(prompt, params, request_id, resume)  # raises ValueError on bad input
        q: asyncio.Queue = asyncio.Queue()
        self.queues[req.request_id] = q
        self._ensure_loop()
        self._wake.set()
        try:
            while True:
                item = await q.get()
                if isinstance(item, Exception):
                    raise wrap_step_error(req.request_id, item) from item
                yield item
                if item.finished:
                    return
        finally:
            self.queues.pop(req.request_id, None)
            if not req.finished:
                await asyncio.to_thread(self.engine.abort, req.request_id)
                self.engine.report_idle()

    async def abort(self, request_id: str) -> None:
        await asyncio.to_thread(self.engine.abort, request_id)
        self.engine.report_idle()
        q = self.queues.get(request_id)
        if q is not None:
            q.put_nowait(RequestOutput(request_id, [], "", True, FinishReason.ABORT, Usage()))
