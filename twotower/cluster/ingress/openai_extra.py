"""The HTTP routes beside completions, added to the app by `openai_app.build_openai_app`:

- `POST /v1/chat/completions`: the messages go through the model's chat template (the tokenizer's
  `chat_template`, rendered in a Jinja sandbox) and then run as a completion, JSON or SSE; a model with
  no chat template answers 400 naming `messages`;
- `POST /tokenize` `{"prompt"}` -> `{"tokens", "count", "max_model_len"}`, `POST /detokenize` `{"tokens"}`
  -> `{"prompt"}` and `GET /tokenizer_info`, named and shaped as vLLM's, so that clients written for it
  (lm-eval-harness's remote tokenizer among them) work unchanged;
- `GET /version` -> `{"version"}`.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from twotower.cluster.engine.version import version

from .api_types import ModelInfo, ServerClient
from .openai_protocol import OpenAIError, error_from_exception, invalid, model_not_found

# Chat fields that carry over to the completion unchanged (the twotower sampling fields among them);
# anything else is refused by the completions parser, naming the field.
_CHAT_ONLY = ("messages", "max_completion_tokens", "logprobs", "top_logprobs")


def _fields(body: Any, allowed: dict[str, type], served_model_name: str) -> dict:
    if not isinstance(body, dict):
        raise invalid("request body: must be a JSON object")
    for k, v in body.items():
        if k not in allowed:
            raise invalid(f"{k}: unrecognized request argument", k)
        if v is not None and not isinstance(v, allowed[k]) or isinstance(v, bool) and allowed[k] is not bool:
            raise invalid(f"{k}: must be a {allowed[k].__name__} (got {v!r})", k)
    if body.get("model") is not None and body["model"] != served_model_name:
        raise model_not_found(body["model"])
    return body


def _messages(v: Any) -> list[dict]:
    if not isinstance(v, list) or not v:
        raise invalid("messages: must be a non-empty list of {role, content} objects", "messages")
    for i, m in enumerate(v):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise invalid(f"messages[{i}]: must be an object with a string role and string content", "messages")
    return v


def render_chat(template: str, messages: list[dict], info: dict) -> str:
    """The prompt text of `messages` under a Hugging Face chat template (sandboxed Jinja)."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=True,
                                                bos_token=info.get("bos_token") or "",
                                                eos_token=info.get("eos_token") or "")  # fmt: skip
    except TemplateError as e:
        raise invalid(f"messages: the chat template failed on them ({type(e).__name__}: {e})", "messages") from None


async def _ask(call: Awaitable):
    """A server call, its failures mapped as every route maps them (InvalidRequest -> 400, ...)."""
    try:
        return await call
    except OpenAIError:
        raise
    except Exception as e:
        raise error_from_exception(e) from e


def _chat_choice(c: dict) -> dict:
    return {"index": c["index"], "message": {"role": "assistant", "content": c["text"]}, "logprobs": None,
            "finish_reason": c["finish_reason"]}  # fmt: skip


async def _chat_chunks(sse: AsyncIterator[str], chat_id: str) -> AsyncIterator[str]:
    """Completion SSE chunks -> chat.completion.chunk events (errors and [DONE] pass through)."""
    first: set[int] = set()
    try:
        async for event in sse:
            if not event.startswith("data: {"):
                yield event
                continue
            obj = json.loads(event[len("data: ") :])
            choices = []
            for c in obj["choices"]:
                delta = {"content": c["text"]}
                if c["index"] not in first:
                    first.add(c["index"])
                    delta = {"role": "assistant", **delta}
                choices.append({"index": c["index"], "delta": delta, "logprobs": None,
                                "finish_reason": c["finish_reason"]})  # fmt: skip
            obj.update(id=chat_id, object="chat.completion.chunk", choices=choices)
            yield f"data: {json.dumps(obj)}\n\n"
    finally:
        await sse.aclose()


def add_extra_routes(app: FastAPI, server: ServerClient, served_model_name: str,
                     model_info: Callable[[], Awaitable[ModelInfo]],
                     read_body: Callable[[Request], Awaitable[tuple[Any, str, bool]]],
                     complete: Callable[[Request, Any, str, bool], Awaitable[Response]]) -> None:  # fmt: skip
    """model_info / read_body / complete: the app's cached model info, body reader and completions runner."""

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict:
        body, _, _ = await read_body(request)
        body = _fields(body, {"model": str, "prompt": str, "add_special_tokens": bool}, served_model_name)
        if not isinstance(body.get("prompt"), str):
            raise invalid("prompt: required, a string", "prompt")
        tokens = await _ask(server.tokenize(body["prompt"]))  # the model's tokenizer adds no special tokens
        return {"tokens": tokens, "count": len(tokens), "max_model_len": (await model_info()).max_model_len}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict:
        body, _, _ = await read_body(request)
        body = _fields(body, {"model": str, "tokens": list}, served_model_name)
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise invalid("tokens: required, a list of token ids", "tokens")
        return {"prompt": await _ask(server.detokenize(tokens))}

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict:
        return await _ask(server.tokenizer_info())

    @app.get("/version")
    async def get_version() -> dict:
        return {"version": version()}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body, request_id, given = await read_body(request)
        if not isinstance(body, dict):
            raise invalid("request body: must be a JSON object")
        messages = _messages(body.get("messages"))
        if body.get("logprobs") or body.get("top_logprobs"):
            raise invalid("logprobs: not supported for chat completions; use /v1/completions", "logprobs")
        info = await _ask(server.tokenizer_info())
        template = info.get("chat_template")
        if not template:
            raise invalid(f"messages: the model `{served_model_name}` has no chat template; send the prompt "
                          "text to /v1/completions instead", "messages")  # fmt: skip
        prompt = render_chat(template, messages, info)
        completion = {k: v for k, v in body.items() if k not in _CHAT_ONLY}
        if body.get("max_completion_tokens") is not None:
            completion["max_tokens"] = body["max_completion_tokens"]
        completion["prompt"] = prompt
        resp = await complete(request, completion, request_id, given)
        chat_id = f"chatcmpl-{request_id}"
        if isinstance(resp, JSONResponse):
            obj = json.loads(resp.body)
            obj.update(id=chat_id, object="chat.completion", created=obj.get("created", int(time.time())),
                       choices=[_chat_choice(c) for c in obj["choices"]])  # fmt: skip
            return JSONResponse(obj, headers={k: v for k, v in resp.headers.items() if k.startswith("x-")})
        if hasattr(resp, "body_iterator"):
            resp.body_iterator = _chat_chunks(resp.body_iterator, chat_id)
        return resp

