"""OpenAI-compatible HTTP ingress over any `ServerClient`: `POST /v1/completions` (JSON, or an SSE stream),
`GET /v1/models`, `GET /v1/models/{id}` and `GET /health`.

`build_openai_app(server, served_model_name)` returns a FastAPI app. Under Ray Serve, build it in the
replica: `@serve.ingress()` on the deployment class plus a `__serve_build_asgi_app__` method that
returns `build_openai_app(self.client, name)`. The conversion between OpenAI JSON and api_types lives in
this module and nowhere else: request fields -> `GenerateRequest.sampling` (only the fields the caller
gave; the server applies its defaults), `GenerateDelta`s -> completion objects or SSE chunks.

Contract (docs/http.md has the user-facing version):
- every bad value is an HTTP 400 `{"error": {"message", "type": "invalid_request_error", "param", "code"}}`
  naming the field, found before the server is asked to generate (types here, ranges against the
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
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .api_types import SAMPLING_FIELDS, GenerateDelta, GenerateRequest, ModelInfo, ServerClient
from .sampling import ModelLimits, SamplingParams

log = logging.getLogger("twotower.openai_api")

REQUEST_ID_HEADER = "X-Request-Id"
_REQUEST_ID_RE = re.compile(r"^[\x21-\x7e]{1,128}$")  # visible ASCII, no spaces

# Request fields, by how they map to SamplingParams. Every SamplingParams field has an entry.
_INT_FIELDS = ("max_tokens", "seed", "block_size", "steps_per_block", "top_k")
_NUM_FIELDS = ("temperature", "top_p", "gamma")
_BOOL_FIELDS = ("ignore_eos",)
_STR_FIELDS = ("mode",)
_SPECIAL_FIELDS = ("stop", "stop_token_ids", "logprobs")  # converted one by one below
# OpenAI fields we accept only at their neutral value: (test, what is supported).
_NEUTRAL: dict[str, tuple[Any, str]] = {
    "n": (lambda v: _is_int(v) and v == 1, "only n=1 is supported"),
    "best_of": (lambda v: _is_int(v) and v == 1, "only best_of=1 is supported"),
    "echo": (lambda v: v is False, "echo is not supported"),
    "frequency_penalty": (lambda v: _is_num(v) and v == 0, "only 0 is supported"),
    "presence_penalty": (lambda v: _is_num(v) and v == 0, "only 0 is supported"),
    "logit_bias": (lambda v: v == {}, "not supported"),
    "suffix": (lambda v: v == "", "not supported"),
}
_OTHER_FIELDS = ("model", "prompt", "stream", "stream_options", "user")
KNOWN_FIELDS = frozenset(
    _INT_FIELDS + _NUM_FIELDS + _BOOL_FIELDS + _STR_FIELDS + _SPECIAL_FIELDS + tuple(_NEUTRAL) + _OTHER_FIELDS
)
_FIELD_RE = re.compile(r"^(?:SamplingParams\.)?([A-Za-z_][A-Za-z0-9_.]*)\s*:")
_UNAVAILABLE = frozenset(
    {"BackPressureError", "DeploymentUnavailableError", "ReplicaUnavailableError", "RayActorError"}
)
_FINISH = {"stop": "stop", "length": "length", "abort": "abort"}  # "error" becomes an error object

_background: set[asyncio.Task] = set()  # strong references to request streams still cleaning up


# ---- errors ----------------------------------------------------------------------------------------
class OpenAIError(Exception):
    """An error answered as `{"error": {...}}` with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 err_type: str | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = err_type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None) -> OpenAIError:
    """A 400; `param` defaults to the field named at the start of the message (`max_tokens: ...`)."""
    message = message.removeprefix("SamplingParams.")
    if param is None:
        m = _FIELD_RE.match(message)
        if m and m.group(1).split(".")[0] in KNOWN_FIELDS:
            param = m.group(1)
    return OpenAIError(400, message, param)


def error_from_exception(e: BaseException) -> OpenAIError:
    """Map what the server raised to an HTTP error."""
    if isinstance(e, OpenAIError):
        return e
    cause = getattr(e, "cause", None)  # a RayTaskError carries the remote exception
    if type(e).__name__.startswith("RayTaskError") and isinstance(cause, BaseException):
        e = cause
    if isinstance(e, ValueError):  # InvalidRequest included
        return invalid(str(e))
    names = {c.__name__ for c in type(e).__mro__}
    if isinstance(e, ConnectionError) or names & _UNAVAILABLE:
        return OpenAIError(503, f"server unavailable: {type(e).__name__}: {e}")
    if isinstance(e, TimeoutError):
        return OpenAIError(504, f"server timed out: {e}" if str(e) else "server timed out")
    log.error("completion failed", exc_info=e)
    return OpenAIError(500, f"server error: {type(e).__name__}: {e}")


def _error_response(err: OpenAIError, request_id: str | None = None) -> JSONResponse:
    headers = {REQUEST_ID_HEADER: request_id} if request_id else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def _model_not_found(name: Any) -> OpenAIError:
    return OpenAIError(404, f"The model `{name}` does not exist.", "model", "model_not_found")


# ---- request conversion ----------------------------------------------------------------------------
@dataclass
class CompletionRequest:
    prompts: list[str | list[int]]  # one entry per choice
    sampling: dict[str, Any] = field(default_factory=dict)  # SamplingParams fields the caller gave
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a final chunk with the usage
    continuous_usage: bool = False  # stream_options.continuous_usage_stats: usage on every chunk

    @property
    def logprobs(self) -> bool:
        return bool(self.sampling.get("logprobs"))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _parse_prompt(p: Any, max_prompts: int) -> list[str | list[int]]:
    def ids(x: list) -> list[int]:
        if any(t < 0 for t in x):
            raise invalid("prompt: token ids must be non-negative", "prompt")
        return list(x)

    if p is None:
        raise invalid("prompt: required (a string, a list of token ids, or a list of either)", "prompt")
    if isinstance(p, str):
        return [p]
    if isinstance(p, list) and p:
        if all(_is_int(t) for t in p):
            return [ids(p)]
        if all(isinstance(x, str) for x in p):
            out = list(p)
        elif all(isinstance(x, list) and x and all(_is_int(t) for t in x) for x in p):
            out = [ids(x) for x in p]
        else:
            raise invalid("prompt: a list must hold only token ids, only strings, or only lists of token ids",
                          "prompt")  # fmt: skip
        if len(out) > max_prompts:
            raise invalid(f"prompt: at most {max_prompts} prompts per request (got {len(out)})", "prompt")
        return out
    if isinstance(p, list):
        raise invalid("prompt: must not be empty", "prompt")
    raise invalid(f"prompt: must be a string, a list of token ids, or a list of either (got {type(p).__name__})",
                  "prompt")  # fmt: skip


def parse_completion_request(body: Any, served_model_name: str, max_prompts: int = 64) -> CompletionRequest:
    """Check the types of an OpenAI completions body and convert it; raises OpenAIError (400 / 404)."""
    if not isinstance(body, dict):
        raise invalid("request body: must be a JSON object")
    unknown = sorted(k for k in body if k not in KNOWN_FIELDS)
    if unknown:
        raise invalid(f"{unknown[0]}: unrecognized request argument", unknown[0])
    model = body.get("model")
    if model is not None:
        if not isinstance(model, str):
            raise invalid("model: must be a string", "model")
        if model != served_model_name:
            raise _model_not_found(model)
    req = CompletionRequest(_parse_prompt(body.get("prompt"), max_prompts))
    given = {k: v for k, v in body.items() if v is not None}  # null = absent, as OpenAI clients send it

    for name, (ok, supported) in _NEUTRAL.items():
        if name in given and not ok(given[name]):
            raise invalid(f"{name}: {supported} (got {given[name]!r})", name)
    s = req.sampling
    for name in _INT_FIELDS:
        if name in given:
            if not _is_int(given[name]):
                raise invalid(f"{name}: must be an integer (got {given[name]!r})", name)
            s[name] = given[name]
    for name in _NUM_FIELDS:
        if name in given:
            if not _is_num(given[name]):
                raise invalid(f"{name}: must be a number (got {given[name]!r})", name)
            s[name] = float(given[name])
    for name in _BOOL_FIELDS:
        if name in given:
            if not isinstance(given[name], bool):
                raise invalid(f"{name}: must be true or false (got {given[name]!r})", name)
            s[name] = given[name]
    for name in _STR_FIELDS:
        if name in given:
            if not isinstance(given[name], str):
                raise invalid(f"{name}: must be a string (got {given[name]!r})", name)
            s[name] = given[name]
    if "stop" in given:
        stop = given["stop"]
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(x, str) and x for x in stop):
            raise invalid(f"stop: must be a non-empty string or a list of them (got {given['stop']!r})", "stop")
        s["stop"] = stop
    if "stop_token_ids" in given:
        ids = given["stop_token_ids"]
        if not isinstance(ids, list) or not all(_is_int(t) for t in ids):
            raise invalid(f"stop_token_ids: must be a list of token ids (got {ids!r})", "stop_token_ids")
        s["stop_token_ids"] = list(ids)
    if "logprobs" in given:  # OpenAI: how many top alternatives (0 = only the sampled token's); ours: on/off
        lp = given["logprobs"]
        if not (isinstance(lp, bool) or (_is_int(lp) and lp >= 0)):
            raise invalid(f"logprobs: must be a non-negative integer or a boolean (got {lp!r})", "logprobs")
        s["logprobs"] = lp is not False
    if "stream" in given:
        if not isinstance(given["stream"], bool):
            raise invalid(f"stream: must be true or false (got {given['stream']!r})", "stream")
        req.stream = given["stream"]
    if "stream_options" in given:
        so = given["stream_options"]
        if not req.stream:
            raise invalid("stream_options: only allowed when stream is true", "stream_options")
        if not isinstance(so, dict):
            raise invalid("stream_options: must be an object", "stream_options")
        for k, v in so.items():
            if k not in ("include_usage", "continuous_usage_stats", "include_obfuscation"):
                raise invalid(f"stream_options.{k}: unrecognized option", f"stream_options.{k}")
            if v is not None and not isinstance(v, bool):
                raise invalid(f"stream_options.{k}: must be true or false (got {v!r})", f"stream_options.{k}")
        req.include_usage = bool(so.get("include_usage"))
        req.continuous_usage = bool(so.get("continuous_usage_stats"))
    return req


def limits_of(info: ModelInfo) -> ModelLimits:
    return ModelLimits(info.vocab_size, info.max_model_len, info.max_block_size, tuple(info.modes))


def check_against_model(req: CompletionRequest, info: ModelInfo) -> None:
    """Range checks against the model's limits, with the server's defaults for what the caller left out;
    raises a 400 naming the field. The server checks again (and checks the length of text prompts)."""
    limits = limits_of(info)
    defaults = {k: v for k, v in (info.defaults or {}).items() if k in SAMPLING_FIELDS}
    try:
        params = SamplingParams(**{**defaults, **req.sampling})
        params.validate(limits)
        for p in req.prompts:
            if isinstance(p, list):
                if any(t >= limits.vocab_size for t in p):
                    raise ValueError(f"prompt: token ids must be integers in [0, {limits.vocab_size})")
                params.validate(limits, len(p))
    except ValueError as e:
        raise invalid(str(e)) from None


def to_generate_requests(req: CompletionRequest, request_ids: list[str]) -> list[GenerateRequest]:
    out = []
    for rid, p in zip(request_ids, req.prompts, strict=True):
        text, ids = (p, None) if isinstance(p, str) else (None, list(p))
        out.append(GenerateRequest(rid, prompt=text, prompt_token_ids=ids, sampling=dict(req.sampling)))
    return out


def server_request_ids(request_id: str, given: bool, n: int) -> list[str]:
    """Ids the server sees: unique even when callers reuse an X-Request-Id, prefixed by it for the logs."""
    base = f"{request_id}-{uuid.uuid4().hex[:8]}" if given else request_id
    return [base] if n == 1 else [f"{base}-{i}" for i in range(n)]


# ---- response conversion ---------------------------------------------------------------------------
def _logprobs_obj(token_ids: list[int], logprobs: list[float] | None) -> dict:
    """OpenAI `logprobs`: the sampled tokens as `token_id:<id>` (the ingress has no tokenizer), their
    log-probabilities, and no top alternatives."""
    return {"tokens": [f"token_id:{t}" for t in token_ids], "token_logprobs": list(logprobs or []),
            "top_logprobs": None, "text_offset": None}  # fmt: skip


def usage_obj(finals: list[GenerateDelta]) -> dict:
    p = sum(d.prompt_tokens for d in finals)
    c = sum(d.completion_tokens for d in finals)
    den = sum(d.denoiser_forwards for d in finals)
    ctx = sum(d.context_forwards for d in finals)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
            "twotower": {"denoiser_forwards": den, "context_forwards": ctx,
                         "tokens_per_forward": c / (den + ctx) if den + ctx else 0.0}}  # fmt: skip


def _finish_reason(d: GenerateDelta) -> str | None:
    if not d.finished:
        return None
    if d.finish_reason == "error":
        raise RuntimeError(d.error or "the server failed this request")
    return _FINISH.get(d.finish_reason or "stop", d.finish_reason)


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
                     cleanup_timeout_s: float = 5.0, health_timeout_s: float = 10.0) -> FastAPI:  # fmt: skip
    """FastAPI app serving the OpenAI completions API for `served_model_name` on `server`.

    max_prompts: the largest batch (`prompt` as a list of prompts); cleanup_timeout_s: how long an abort
    may take once a client has gone; health_timeout_s: the bound on one health probe of the server.
    """
    app = FastAPI(title="twotower", summary="OpenAI-compatible completions for a two-tower block-diffusion LM")
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
        log.error("unhandled error on %s", request.url.path, exc_info=e)
        return _error_response(OpenAIError(500, f"internal error: {type(e).__name__}"),
                               getattr(request.state, "request_id", None))  # fmt: skip

    @app.get("/health")
    async def health() -> Response:
        try:
            with anyio.fail_after(health_timeout_s):
                if hasattr(server, "health"):
                    ok = bool(await server.health())
                elif hasattr(server, "check_health"):
                    await server.check_health()
                    ok = True
                else:
                    await server.model_info()
                    ok = True
        except Exception as e:
            raise OpenAIError(503, f"unhealthy: {type(e).__name__}: {e}") from e
        if not ok:
            raise OpenAIError(503, "unhealthy: the server reports a failure")
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
            raise _model_not_found(model_id)
        return model_card(await model_info())

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        given_id = request.headers.get(REQUEST_ID_HEADER)
        if given_id is not None and not _REQUEST_ID_RE.match(given_id):
            raise invalid(f"{REQUEST_ID_HEADER} header: must be 1-128 visible ASCII characters", REQUEST_ID_HEADER)
        request_id = given_id or uuid.uuid4().hex
        request.state.request_id = request_id
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as e:
            raise invalid(f"request body: not valid JSON ({e})") from None
        creq = parse_completion_request(body, served_model_name, max_prompts)
        check_against_model(creq, await model_info())
        reqs = to_generate_requests(creq, server_request_ids(request_id, given_id is not None, len(creq.prompts)))
        fan = _Fanout(server, reqs, cleanup_timeout_s)
        ctx = _Context(f"cmpl-{request_id}", int(time.time()), served_model_name, creq)
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
                completed, result = await _until_disconnect(request, _collect(fan, ctx))
            except Exception as e:
                raise error_from_exception(e) from e
            if not completed:  # the client is gone; nobody reads this
                return Response(status_code=499)
            return JSONResponse(result, headers={REQUEST_ID_HEADER: request_id})
        finally:
            if not handed_off:
                await fan.close()

    return app


@dataclass
class _Context:
    id: str
    created: int
    model: str
    req: CompletionRequest

    def chunk(self, choices: list[dict], usage: dict | None = None) -> dict:
        out = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
               "choices": choices}  # fmt: skip
        if self.req.include_usage or self.req.continuous_usage:
            out["usage"] = usage
        return out


async def _collect(fan: _Fanout, ctx: _Context) -> dict:
    n = len(ctx.req.prompts)
    texts: list[list[str]] = [[] for _ in range(n)]
    tokens: list[list[int]] = [[] for _ in range(n)]
    lps: list[list[float]] = [[] for _ in range(n)]
    finals: list[GenerateDelta | None] = [None] * n
    while fan.open:
        i, d = await fan.next()
        texts[i].append(d.text)
        tokens[i].extend(d.token_ids)
        lps[i].extend(d.logprobs or [])
        if d.finished:
            _finish_reason(d)  # raises on an error delta
            finals[i] = d
    choices = []
    for i, d in enumerate(finals):
        choice = {"index": i, "text": "".join(texts[i]), "logprobs": None, "finish_reason": _finish_reason(d)}
        if ctx.req.logprobs:
            choice["logprobs"] = _logprobs_obj(tokens[i], lps[i])
        if d.seed is not None:
            choice["seed"] = d.seed
        choices.append(choice)
    return {"id": ctx.id, "object": "text_completion", "created": ctx.created, "model": ctx.model,
            "choices": choices, "usage": usage_obj(finals)}  # fmt: skip


def _sse_data(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def _sse(fan: _Fanout, first: list[tuple[int, GenerateDelta]], ctx: _Context) -> AsyncIterator[str]:
    """The SSE body: one chunk per delta, a usage chunk when asked, then `[DONE]`; on a failure an
    `event: error` and the end. Closing this generator (client gone) aborts what is still running."""
    finals: dict[int, GenerateDelta] = {}
    try:
        pending = list(first)
        while pending or fan.open:
            i, d = pending.pop(0) if pending else await fan.next()
            reason = _finish_reason(d)
            if not d.finished and not d.text and not d.token_ids:
                continue
            choice = {"index": i, "text": d.text, "logprobs": None, "finish_reason": reason}
            if ctx.req.logprobs:
                choice["logprobs"] = _logprobs_obj(d.token_ids, d.logprobs)
            if d.finished:
                finals[i] = d
                if d.seed is not None:
                    choice["seed"] = d.seed
            yield _sse_data(ctx.chunk([choice], usage_obj([d]) if ctx.req.continuous_usage else None))
        if ctx.req.include_usage:
            yield _sse_data(ctx.chunk([], usage_obj([finals[i] for i in sorted(finals)])))
        yield "data: [DONE]\n\n"
    except Exception as e:
        err = error_from_exception(e)
        yield f"event: error\n{_sse_data(err.body())}"
    finally:
        await fan.close()
