"""ServerClient over a Serve DeploymentHandle to the tower-pair server deployment.

Streaming goes through `handle.options(stream=True)`. Cancellation is by request, not by id: closing a
stream cancels its response, which closes the server's generator on whichever replica runs it, and
that aborts the request there (an `abort` call by id could reach another replica).

Migration. When a stream's pair dies (an UNAVAILABLE-class error: engine.errors.TowersUnavailable, a dead
replica actor), the stream goes on on another replica: the request is sent again with a `Resume` of
the tokens already streamed (whole committed blocks), their logprobs, the characters of text sent, and
the seed the server reported, so greedy and seeded streams continue exactly where they were. The client
sees one stream with no token repeated or lost. At most `migration_limit` moves per request (0 = off:
the stream ends UNAVAILABLE). An attempt that fails before it streamed anything (a replica that is
dying, or already dead and still routed to) is retried with backoff without counting as a move.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable

from ray.exceptions import RayTaskError

from twotower.cluster.engine.request import Resume
from twotower.cluster.ingress.api_types import (
    GenerateDelta,
    GenerateRequest,
    InvalidRequest,
    ModelInfo,
    ScoreRequest,
    ScoreResult,
)
from twotower.cluster.ingress.errors import is_unavailable

log = logging.getLogger("twotower.migration")
REJECT_BACKOFF_S = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0)  # retries of attempts that streamed nothing (~8 s)


def _unwrap(e: RayTaskError) -> BaseException:
    cause = getattr(e, "cause", None)
    if isinstance(cause, ValueError):  # InvalidRequest is a ValueError
        return InvalidRequest(str(cause))
    return e


class _Progress:
    """What one request has streamed so far, across attempts: enough to resume it elsewhere."""

    def __init__(self, req: GenerateRequest) -> None:
        self.req, self.t0 = req, time.monotonic()
        self.token_ids: list[int] = []
        self.chunks: list[int] = []  # tokens per delta
        self.logprobs: list[float] | None = None
        self.text_chars = 0
        self.seed: int | None = None
        self.last: GenerateDelta | None = None

    def add(self, d: GenerateDelta) -> None:
        self.token_ids += d.token_ids
        if d.token_ids:
            self.chunks.append(len(d.token_ids))
        if d.logprobs is not None:
            self.logprobs = (self.logprobs or []) + list(d.logprobs)
        self.text_chars += len(d.text)
        self.seed = d.seed if d.seed is not None else self.seed
        self.last = d

    def next_request(self) -> GenerateRequest:
        """The request to send for the next attempt: the original, or its continuation."""
        if not self.token_ids:
            return self.req
        sampling = dict(self.req.sampling)
        if self.seed is not None:
            sampling["seed"] = self.seed  # the effective seed: the continuation samples as the first pair would
        deadline = self.req.deadline_s
        if deadline is not None:
            deadline = max(deadline - (time.monotonic() - self.t0), 1e-3)
        d = self.last
        resume = Resume(list(self.token_ids), self.logprobs, self.text_chars, d.denoiser_forwards, d.context_forwards,
                        list(self.chunks))  # fmt: skip
        return dataclasses.replace(self.req, sampling=sampling, deadline_s=deadline, resume=resume)


class HandleClient:
    def __init__(self, handle, migration_limit: int = 1, on_migrate: Callable[[], None] | None = None) -> None:
        self.handle = handle
        self.migration_limit = migration_limit
        self.on_migrate = on_migrate
        self.inflight: dict[str, object] = {}  # request id -> its streaming response
        self.migrations = 0  # requests moved to another replica (for tests and metrics)

    async def generate(self, req: GenerateRequest) -> AsyncIterator[GenerateDelta]:
        progress, moves, rejects = _Progress(req), 0, 0
        while True:
            streamed = False
            try:
                async for delta in self._attempt(progress.next_request()):
                    streamed = True
                    progress.add(delta)
                    yield delta
                    if delta.finished:
                        return
                return  # a stream that ended without a finished delta was cancelled
            except Exception as e:
                if not is_unavailable(e):
                    raise
                if not streamed and rejects < len(REJECT_BACKOFF_S):  # nothing of this attempt went out
                    await asyncio.sleep(REJECT_BACKOFF_S[rejects])
                    rejects += 1
                    continue
                if not streamed or moves >= self.migration_limit:
                    raise
                moves, rejects = moves + 1, 0
                self.migrations += 1
                if self.on_migrate is not None:
                    self.on_migrate()
                log.warning("request %s: pair lost after %d tokens (%s); resuming on another replica (move %d)",
                            req.request_id, len(progress.token_ids), type(e).__name__, moves)  # fmt: skip

    async def _attempt(self, req: GenerateRequest) -> AsyncIterator[GenerateDelta]:
        resp = self.handle.options(stream=True).generate.remote(req)
        self.inflight[req.request_id] = resp
        done = False
        try:
            async for delta in resp:
                yield delta
                done = delta.finished
        except RayTaskError as e:
            raise _unwrap(e) from e
        finally:
            if self.inflight.get(req.request_id) is resp:
                del self.inflight[req.request_id]
            if not done:
                resp.cancel()

    async def score(self, req: ScoreRequest) -> ScoreResult:
        return await self._call("score", req)

    async def model_info(self) -> ModelInfo:
        return await self.handle.model_info.remote()

    async def _call(self, method: str, *args):
        try:
            return await getattr(self.handle, method).remote(*args)
        except RayTaskError as e:
            raise _unwrap(e) from e

    async def tokenize(self, text: str) -> list[int]:
        return await self._call("tokenize", text)

    async def detokenize(self, token_ids: list[int]) -> str:
        return await self._call("detokenize", token_ids)

    async def tokenizer_info(self) -> dict:
        return await self._call("tokenizer_info")

    async def health(self) -> bool:
        try:
            return bool(await self.handle.health.remote())
        except Exception:
            return False

    async def abort(self, request_id: str) -> None:
        resp = self.inflight.pop(request_id, None)
        if resp is not None:
            resp.cancel()
