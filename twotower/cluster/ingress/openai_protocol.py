"""The OpenAI completions protocol, without a web framework: OpenAI JSON <-> api_types.

Everything `openai_api.py` (the HTTP transport, where the contract is written down) needs to read a
request and write an answer, as plain functions of plain values: the error object (`OpenAIError`) and
the mapping of server exceptions to it; the request fields, their type checks and their conversion to
`GenerateRequest`s (only the fields the caller gave go to `GenerateRequest.sampling`; the server applies
its defaults); the range checks against the model's limits; and the completion objects, chunks and
usage built from `GenerateDelta`s. This conversion lives here and nowhere else.
"""

from __future__ import annotations

import logging
import math
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from twotower.cluster.engine.params import MAX_TOP_LOGPROBS, ModelLimits, SamplingParams

from .api_types import SAMPLING_FIELDS, GenerateDelta, GenerateRequest, ModelInfo, ScoreResult, TopLogprobs
from .errors import classify

log = logging.getLogger("twotower.openai_api")  # the HTTP API's logger, wherever the message comes from

# Request fields, by how they map to SamplingParams. Every SamplingParams field has an entry.
_INT_FIELDS = ("max_tokens", "seed", "block_size", "steps_per_block", "top_k")
_NUM_FIELDS = ("temperature", "top_p", "gamma")
_BOOL_FIELDS = ("ignore_eos",)
_STR_FIELDS = ("mode",)
_SPECIAL_FIELDS = ("stop", "stop_token_ids", "logprobs", "echo")  # converted one by one below
# OpenAI fields we accept only at their neutral value: (test, what is supported).
_NEUTRAL: dict[str, tuple[Any, str]] = {
    "n": (lambda v: _is_int(v) and v == 1, "only n=1 is supported"),
    "best_of": (lambda v: _is_int(v) and v == 1, "only best_of=1 is supported"),
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
_FINISH = {"stop": "stop", "length": "length", "abort": "abort"}  # "error" becomes an error object


# ---- errors ----------------------------------------------------------------------------------------
class OpenAIError(Exception):
    """An error answered as `{"error": {...}}` with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 err_type: str | None = None, retry_after_s: int | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.retry_after_s = retry_after_s  # sent as Retry-After (429, 503)
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
    """Map what the server raised to an HTTP error (errors.classify)."""
    if isinstance(e, OpenAIError):
        return e
    err = classify(e)
    if err.kind == "INVALID_ARGUMENT":
        return invalid(err.message)
    return OpenAIError(err.http_status, err.message, retry_after_s=err.retry_after_s)  # classify logged it


def model_not_found(name: Any) -> OpenAIError:
    return OpenAIError(404, f"The model `{name}` does not exist.", "model", "model_not_found")


# ---- request conversion ----------------------------------------------------------------------------
@dataclass
class CompletionRequest:
    prompts: list[str | list[int]]  # one entry per choice
    sampling: dict[str, Any] = field(default_factory=dict)  # SamplingParams fields the caller gave
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a final chunk with the usage
    continuous_usage: bool = False  # stream_options.continuous_usage_stats: usage on every chunk
    top_logprobs: int = 0  # `logprobs: N`: the N most likely alternatives at each position
    echo: bool = False  # the prompt comes back before the completion (with its logprobs when asked)

    @property
    def needs_scores(self) -> bool:
        """Alternatives and prompt logprobs come from scoring the returned text with the context tower."""
        return self.top_logprobs > 0 or (self.echo and self.logprobs)

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
            raise model_not_found(model)
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
        req.top_logprobs = 0 if isinstance(lp, bool) else lp
        if req.top_logprobs > MAX_TOP_LOGPROBS:
            raise invalid(f"logprobs: at most {MAX_TOP_LOGPROBS} alternatives (got {lp})", "logprobs")
    if "echo" in given:
        if not isinstance(given["echo"], bool):
            raise invalid(f"echo: must be true or false (got {given['echo']!r})", "echo")
        req.echo = given["echo"]
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
    if req.stream and req.needs_scores:
        name = "logprobs" if req.top_logprobs else "echo"
        raise invalid(f"{name}: top alternatives and echoed prompt logprobs are computed over the whole "
                      "completion; use stream=false (streams carry the sampled tokens' logprobs)", name)  # fmt: skip
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
def _logprobs_obj(tokens: list[str], logprobs: list[float | None], top: list[dict | None] | None,
                  offset: int = 0) -> dict:  # fmt: skip
    """OpenAI `logprobs`: each token's text, its log-probability, the top alternatives ({text: logprob},
    or None) and the character offset of each token in the choice's text, counted from `offset`."""
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": top, "text_offset": offsets}


def _token_texts(token_ids: list[int], texts: list[str] | None) -> list[str]:
    return list(texts) if texts is not None else [f"token_id:{t}" for t in token_ids]


def _top_dict(top: TopLogprobs | None, token: tuple[str, float | None]) -> dict | None:
    """One position's alternatives as OpenAI writes them, the sampled token always included."""
    if top is None:
        return None
    out = {text: lp for _, text, lp in top}
    if token[0] not in out and token[1] is not None:
        out[token[0]] = token[1]
    return out


@dataclass
class Scored:
    """What scoring added to one choice: the echoed prompt's text, and its OpenAI logprobs object."""

    prompt_text: str
    logprobs: dict | None


def scored_choice(req: CompletionRequest, prompt_text: str, gen_lps: list[float], res: ScoreResult | None) -> Scored:
    """Echo and alternatives of one choice from its score (`res`, over prompt + completion; None when
    only the prompt's text is echoed). With alternatives asked, every logprob is the score's, so each
    token's logprob and its alternatives come from one distribution."""
    head = prompt_text if req.echo else ""
    if res is None or not req.logprobs:
        return Scored(head, None)
    texts = _token_texts(res.token_ids, res.token_texts)
    lps: list[float | None] = list(res.logprobs) if req.top_logprobs else list(gen_lps)
    tops = res.top_logprobs if req.top_logprobs else None
    top = None if tops is None else [_top_dict(t, (x, lp)) for t, x, lp in zip(tops, texts, lps, strict=True)]
    if req.echo:
        p_texts = _token_texts(res.prompt_token_ids or [], res.prompt_token_texts)
        p_lps = list(res.prompt_logprobs or [])
        texts, lps = p_texts + texts, p_lps + lps
        if top is not None:
            p_top = [_top_dict(t, (x, lp)) for t, x, lp in zip(res.prompt_top_logprobs or [], p_texts, p_lps,
                                                                 strict=True)]  # fmt: skip
            top = p_top + top
    return Scored(head, _logprobs_obj(texts, lps, top))


def usage_obj(finals: list[GenerateDelta]) -> dict:
    p = sum(d.prompt_tokens for d in finals)
    c = sum(d.completion_tokens for d in finals)
    den = sum(d.denoiser_forwards for d in finals)
    ctx = sum(d.context_forwards for d in finals)
    cached = sum(d.cached_tokens for d in finals)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": cached},
            "twotower": {"denoiser_forwards": den, "context_forwards": ctx,
                         "tokens_per_forward": c / (den + ctx) if den + ctx else 0.0}}  # fmt: skip


def finish_reason(d: GenerateDelta) -> str | None:
    if not d.finished:
        return None
    if d.finish_reason == "error":
        raise RuntimeError(d.error or "the server failed this request")
    return _FINISH.get(d.finish_reason or "stop", d.finish_reason)


@dataclass
class CompletionContext:
    """What the objects of one completion share: its id, creation time, model name and request."""

    id: str
    created: int
    model: str
    req: CompletionRequest

    def choice(self, index: int, text: str, token_ids: list[int], logprobs: list[float] | None,
               last: GenerateDelta, token_texts: list[str] | None = None, scored: Scored | None = None,
               offset: int = 0) -> dict:  # fmt: skip
        """Prompt `index`'s choice for `text` / `token_ids` / `logprobs` (`token_texts`: each token's text);
        `last`, its latest delta, gives the finish reason and seed once it is the final one; `scored`, the
        echo and alternatives; `offset`, where `text` starts in the choice's whole text (streams). Raises
        on a failed final delta."""
        head = scored.prompt_text if scored is not None else ""
        choice = {"index": index, "text": head + text, "logprobs": None, "finish_reason": finish_reason(last)}
        if scored is not None and scored.logprobs is not None:
            choice["logprobs"] = scored.logprobs
        elif self.req.logprobs:
            choice["logprobs"] = _logprobs_obj(_token_texts(token_ids, token_texts), list(logprobs or []), None,
                                               offset + len(head))  # fmt: skip
        if last.finished and last.seed is not None:
            choice["seed"] = last.seed
        return choice

    def completion(self, choices: list[dict], usage: dict | None) -> dict:
        """The `text_completion` object: the whole answer, or (`chunk`) one piece of a stream."""
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": usage}  # fmt: skip

    def chunk(self, choices: list[dict], usage: dict | None = None) -> dict:
        """A stream chunk; it has a `usage` field (None on most chunks) only when stream_options asked."""
        out = self.completion(choices, usage)
        if not (self.req.include_usage or self.req.continuous_usage):
            del out["usage"]
        return out
