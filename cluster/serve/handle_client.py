"""ServerClient over a Serve DeploymentHandle to the tower-pair server deployment.

Streaming goes through `handle.options(stream=True)`. Cancellation is by request, not by id: closing a
stream cancels its response, which closes the server's generator on whichever replica runs it, and
that aborts the request there (an `abort` call by id could reach another replica).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from ray.exceptions import RayTaskError

from twotower.cluster.ingress.api_types import (
    GenerateDelta,
    GenerateRequest,
    InvalidRequest,
    ModelInfo,
    ScoreRequest,
    ScoreResult,
)


def _unwrap(e: RayTaskError) -> BaseException:
    cause = getattr(e, "cause", None)
    if isinstance(cause, ValueError):  # InvalidRequest is a ValueError
        return InvalidRequest(str(cause))
    return e


class HandleClient:
    def __init__(self, handle) -> None:
        self.handle = handle
        self.inflight: dict[str, object] = {}  # request id -> its streaming response

    async def generate(self, req: GenerateRequest) -> AsyncIterator[GenerateDelta]:
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
            self.inflight.pop(req.request_id, None)
            if not done:
                resp.cancel()

    async def score(self, req: ScoreRequest) -> ScoreResult:
        try:
            return await self.handle.score.remote(req)
        except RayTaskError as e:
            raise _unwrap(e) from e

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
