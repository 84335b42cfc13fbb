"""OpenAI-compatible HTTP ingress over any `ServerClient`: `POST /v1/completions` (JSON, or an SSE stream),
`GET /v1/models`, `GET /v1/models/{id}` and `GET /health`; openai_extra.py adds chat completions and the
tokenizer routes (`/tokenize`, `/detokenize`, `/tokenizer_info`, `/version`).

`build_openai_app(server, served_model_name)` returns a FastAPI app. Under Ray Serve, build it in the
replica: `@serve.ingress()` on the deployment class plus a `__serve_build_asgi_app__` method that
returns `build_openai_app(self.client, name)`. This module is the transport: the routes, one server
stream per prompt, the JSON answer or SSE stream, and aborting when the client goes away. The conversion
between OpenAI JSON and api_types lives in `openai_protocol.py` and nowhere else: request fields ->
`GenerateRequest.sampling` (only the fields the caller gave; the server applies its defaults),
`GenerateDelta`s -> completion objects or SSE chunks, exceptions -> error objects.

Contract (docs/http.md has the user-facing version):
- every bad value is an HTTP 400 `{"error": {"message", "type": "invalid_request_error", "param", "code"}}`
  naming the field, found before the server is asked to generate (types, then ranges against the
  model's limits from `model_info`); the server's own InvalidRequest / ValueError is a 400 too;
- an unknown `model` is a 404 with code `model_not_found`; unknown request fields are refused (a typo
  in a diffusion field would otherwise run silently with the default);
- failures before the first byte are JSON errors (500, 503 when the server is unavailable or
  overloaded, 504 on a timeout); a failure mid-stream is an SSE `event: error` whose data is the same
  error object, and the stream ends without `[DONE]`;
- a client that goes away (stream or not) aborts its requests on the server.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .api_types import GenerateDelta, GenerateRequest, ModelInfo, ScoreRequest, ServerClient
from .auth import UNAUTHENTICATED, ApiKeys
from .errors import report_error
from .health import server_healthy
from .openai_extra import add_extra_routes
from .openai_protocol import (
    CompletionContext,
    CompletionRequest,
    OpenAIError,
    Scored,
    check_against_model,
    error_from_exception,
    finish_reason,
    invalid,
    model_not_found,
    parse_completion_request,
    scored_choice,
    server_request_ids,
    to_generate_requests,
    usage_obj,
)

log = logging.getLogger("twotower.openai_api")

REQUEST_ID_HEADER = "X-Request-Id"
_REQUEST_ID_RE = re.compile(r"^[\x21-\x7e]{1,128}$")  # visible ASCII, no spaces

_background: set[asyncio.Task] = set()  # strong references to request streams still cleaning up


def _error_response(err: OpenAIError, request_id: str | None = None) -> JSONResponse:
    report_error("http", str(err.status))
    headers = {REQUEST_ID_HEADER: request_id} if request_id else {}
    if err.retry_after_s is not None:
        headers["Retry-After"] = str(err.retry_after_s)
    return JSONResponse(err.body(), status_code=err.status, headers=headers or None)


# ---- running requests ------------------------------------------------------------------------------
class _Fanout:
    """One server stream per prompt, each pumped by its own task into one queue. `close()` (or a
    stream's own failure) aborts every request that has not finished, and waits a bounded time for it."""

    def __init__(self, server: ServerClient, reqs: list[GenerateRequest], cleanup_timeout_s: float) -> None:
        self.server = server
        self.timeout = cleanup_timeout_s
        self.queue: asyncio.Queue = asyncio.Queue()
        self.open = len(reqs)  # prompts without their final delta yet
        self.tasks = [asyncio.ensure_future(self._pump(i, r)) for i, r in enumerate(reqs)]
        for t in self.tasks:
            _background.add(t)
            t.add_done_callback(_background.discard)

    async def _pump(self, i: int, req: GenerateRequest) -> None:
        stream = self.server.generate(req)
        settled = False  # final delta seen, or the request was refused: nothing left to abort
        try:
            async for d in stream:
                self.queue.put_nowait((i, d))
                if d.finished:
                    settled = True
                    return
            settled = True
            raise RuntimeError(f"the server's stream for {req.request_id} ended without a final delta")
        except ValueError as e:  # refused (InvalidRequest)
            settled = True
            self.queue.put_nowait((i, e))
        except Exception as e:
            self.queue.put_nowait((i, e))
        finally:
            try:
                await asyncio.wait_for(self._cleanup(req.request_id, stream, settled), self.timeout)
            except Exception as e:
                log.warning("cleanup of request %s: %s: %s", req.request_id, type(e).__name__, e)

    async def _cleanup(self, request_id: str, stream: Any, settled: bool) -> None:
        if not settled:
            await self.server.abort(request_id)
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()

    async def next(self) -> tuple[int, GenerateDelta]:
        """The next delta of any prompt; re-raises a stream's failure."""
        i, item = await self.queue.get()
        if isinstance(item, BaseException):
            raise item
        if item.finished:
            self.open -= 1
        return i, item

    async def prime(self) -> list[tuple[int, GenerateDelta]]:
        """Wait for every prompt's first delta, so refusals come back before anything is streamed."""
        seen: set[int] = set()
        buf = []
        while len(seen) < len(self.tasks):
            i, d = await self.next()
            seen.add(i)
            buf.append((i, d))
        return buf

    async def close(self) -> None:
        for t in self.tasks:
            if not t.done():
                t.cancel()
        pending = [t for t in self.tasks if not t.done()]
        if pending:
            with anyio.CancelScope(shield=True):  # also when the caller is being cancelled (disconnect)
                await asyncio.wait(pending, timeout=self.timeout + 1.0)


class _SSEResponse(StreamingResponse):
    """Closes its body when streaming ends for any reason (client gone: OSError or cancellation), so the
    generator's cleanup aborts the requests now rather than whenever the generator is collected."""

    async def stream_response(self, send: Any) -> None:
        try:
            await super().stream_response(send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()


async def _until_disconnect(request: Request, work: Awaitable) -> tuple[bool, Any]:
    """Run `work` unless the client disconnects first: (True, result) or (False, None)."""

    async def disconnected() -> None:
        try:
            while (await request.receive())["type"] != "http.disconnect":
                pass
        except Exception:  # can't tell; let the work finish
            await asyncio.Event().wait()

    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.wait({task})
    if task.cancelled():
        return False, None
    return True, task.result()


# ---- the app ---------------------------------------------------------------------------------------
def build_openai_app(server: ServerClient, served_model_name: str, *, max_prompts: int = 64,
                     cleanup_timeout_s: float = 5.0, health_timeout_s: float = 10.0,
                     api_keys: ApiKeys | None = None,
                     metrics: Callable[[], Awaitable[str]] | None = None) -> FastAPI:  # fmt: skip
    """FastAPI app serving the OpenAI completions API for `served_model_name` on `server`.

    max_prompts: the largest batch (`prompt` as a list of prompts); cleanup_timeout_s: how long an abort
    may take once a client has gone; health_timeout_s: the bound on one health probe of the server;
    api_keys: when given, every route but /health needs one of them (auth.py); metrics: when given,
    `GET /metrics` answers its Prometheus text.
    """
    app = FastAPI(title="twotower", summary="OpenAI-compatible completions for a two-tower block-diffusion LM")

    if api_keys is not None:

        @app.middleware("http")
        async def _authenticate(request: Request, call_next):
            if request.url.path != "/health" and not api_keys.allows(request.headers.get("authorization")):
                err = OpenAIError(401, UNAUTHENTICATED, code="invalid_api_key", err_type="invalid_request_error")
                return JSONResponse(err.body(), status_code=401, headers={"WWW-Authenticate": "Bearer"})
            return await call_next(request)

    created_at = int(time.time())
    cache: dict[str, ModelInfo] = {}

    async def model_info() -> ModelInfo:
        if "info" not in cache:
            try:
                cache["info"] = await server.model_info()
            except Exception as e:
                raise OpenAIError(503, f"model info unavailable: {type(e).__name__}: {e}") from e
        return cache["info"]

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, e: OpenAIError) -> JSONResponse:
        return _error_response(e, getattr(request.state, "request_id", None))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return _error_response(OpenAIError(e.status_code, str(e.detail)))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        return _error_response(error_from_exception(e), getattr(request.state, "request_id", None))  # logs it

    if metrics is not None:

        @app.get("/metrics")
        async def get_metrics() -> Response:
            return Response(await metrics(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/health")
    async def health() -> Response:
        if not await server_healthy(server, health_timeout_s):
            raise OpenAIError(503, "unhealthy: the tower-pair server does not answer or reports a failure")
        return Response(status_code=200)

    def model_card(info: ModelInfo) -> dict:
        return {"id": served_model_name, "object": "model", "created": created_at, "owned_by": "twotower",
                "root": info.path, "parent": None, "max_model_len": info.max_model_len,
                "twotower": {"modes": list(info.modes), "vocab_size": info.vocab_size,
                             "max_block_size": info.max_block_size, "pattern": info.pattern,
                             "hidden_size": info.hidden_size, "defaults": dict(info.defaults),
                             "mask_token_id": info.mask_token_id,
                             "eos_token_ids": list(info.eos_token_ids)}}  # fmt: skip

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card(await model_info())]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict:
        if model_id != served_model_name:
            raise model_not_found(model_id)
        return model_card(await model_info())

    async def read_body(request: Request) -> tuple[Any, str, bool]:
        """(JSON body, request id, whether the caller gave the id); raises a 400 for a bad id or body."""
        given_id = request.headers.get(REQUEST_ID_HEADER)
        if given_id is not None and not _REQUEST_ID_RE.match(given_id):
            raise invalid(f"{REQUEST_ID_HEADER} header: must be 1-128 visible ASCII characters", REQUEST_ID_HEADER)
        request_id = given_id or uuid.uuid4().hex
        request.state.request_id = request_id
        try:
            return json.loads(await request.body()), request_id, given_id is not None
        except (ValueError, UnicodeDecodeError) as e:
            raise invalid(f"request body: not valid JSON ({e})") from None
        except RecursionError:
            raise invalid("request body: JSON nested too deeply") from None

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body, request_id, given = await read_body(request)
        return await complete(request, body, request_id, given)

    async def complete(request: Request, body: Any, request_id: str, given_id: bool) -> Response:
        """Run a completions body: a JSON completion, or an SSE response whose chunks are completions."""
        creq = parse_completion_request(body, served_model_name, max_prompts)
        check_against_model(creq, await model_info())
        reqs = to_generate_requests(creq, server_request_ids(request_id, given_id, len(creq.prompts)))
        fan = _Fanout(server, reqs, cleanup_timeout_s)
        ctx = CompletionContext(f"cmpl-{request_id}", int(time.time()), served_model_name, creq)
        handed_off = False
        try:
            if creq.stream:
                try:
                    first = await fan.prime()
                except Exception as e:
                    raise error_from_exception(e) from e
                handed_off = True
                headers = {REQUEST_ID_HEADER: request_id, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
                return _SSEResponse(_sse(fan, first, ctx), media_type="text/event-stream", headers=headers)
            try:
                completed, result = await _until_disconnect(request, _collect(fan, ctx, server))
            except Exception as e:
                raise error_from_exception(e) from e
            if not completed:  # the client is gone; nobody reads this
                return Response(status_code=499)
            return JSONResponse(result, headers={REQUEST_ID_HEADER: request_id})
        finally:
            if not handed_off:
                await fan.close()

    add_extra_routes(app, server, served_model_name, model_info, read_body, complete)
    return app


async def _prompt_text(server: ServerClient, prompt: str | list[int]) -> str:
    return prompt if isinstance(prompt, str) else await server.detokenize(list(prompt))


async def _scored(server: ServerClient, req: CompletionRequest, prompt: str | list[int], tokens: list[int],
                  lps: list[float]) -> Scored:  # fmt: skip
    """Echo and alternatives of one choice: the context tower scores prompt + completion once."""
    head = await _prompt_text(server, prompt) if req.echo else ""
    if not req.needs_scores or (not tokens and not req.echo):
        return scored_choice(req, head, lps, None) if tokens or req.echo else Scored("", None)
    text, ids = (prompt, None) if isinstance(prompt, str) else (None, list(prompt))
    res = await server.score(ScoreRequest(prompt=text, prompt_token_ids=ids, continuation_token_ids=tokens,
                                          top_logprobs=req.top_logprobs, echo=req.echo))  # fmt: skip
    return scored_choice(req, head, lps, res)


async def _collect(fan: _Fanout, ctx: CompletionContext, server: ServerClient) -> dict:
    n = len(ctx.req.prompts)
    texts: list[list[str]] = [[] for _ in range(n)]
    tokens: list[list[int]] = [[] for _ in range(n)]
    token_texts: list[list[str] | None] = [[] for _ in range(n)]
    lps: list[list[float]] = [[] for _ in range(n)]
    finals: list[GenerateDelta | None] = [None] * n
    while fan.open:
        i, d = await fan.next()
        texts[i].append(d.text)
        tokens[i].extend(d.token_ids)
        if d.token_texts is None or token_texts[i] is None:
            token_texts[i] = None
        else:
            token_texts[i].extend(d.token_texts)
        lps[i].extend(d.logprobs or [])
        if d.finished:
            finish_reason(d)  # raises on an error delta
            finals[i] = d
    choices = []
    for i, d in enumerate(finals):
        scored = None
        if ctx.req.echo or ctx.req.needs_scores:
            scored = await _scored(server, ctx.req, ctx.req.prompts[i], tokens[i], lps[i])
        choices.append(ctx.choice(i, "".join(texts[i]), tokens[i], lps[i], d, token_texts[i], scored))
    return ctx.completion(choices, usage_obj(finals))


def _sse_data(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def _sse(fan: _Fanout, first: list[tuple[int, GenerateDelta]], ctx: CompletionContext) -> AsyncIterator[str]:
    """The SSE body: one chunk per delta, a usage chunk when asked, then `[DONE]`; on a failure an
    `event: error` and the end. Closing this generator (client gone) aborts what is still running."""
    finals: dict[int, GenerateDelta] = {}
    sent = [0] * len(ctx.req.prompts)  # characters of each choice's text streamed so far
    try:
        if ctx.req.echo:  # (echo without logprobs: with them, streaming is refused)
            for i, p in enumerate(ctx.req.prompts):
                head = await _prompt_text(fan.server, p)
                sent[i] = len(head)
                yield _sse_data(ctx.chunk([{"index": i, "text": head, "logprobs": None, "finish_reason": None}]))
        pending = list(first)
        while pending or fan.open:
            i, d = pending.pop(0) if pending else await fan.next()
            if not d.finished and not d.text and not d.token_ids:
                continue
            choice = ctx.choice(i, d.text, d.token_ids, d.logprobs, d, d.token_texts, offset=sent[i])
            sent[i] += len(d.text)
            if d.finished:
                finals[i] = d
            yield _sse_data(ctx.chunk([choice], usage_obj([d]) if ctx.req.continuous_usage else None))
        if ctx.req.include_usage:
            yield _sse_data(ctx.chunk([], usage_obj([finals[i] for i in sorted(finals)])))
        yield "data: [DONE]\n\n"
    except Exception as e:
        err = error_from_exception(e)
        yield f"event: error\n{_sse_data(err.body())}"
    finally:
        await fan.close()
