"""Conversion between the `twotower.v1` protobuf messages (twotower/protos/twotower_v1.proto) and `api_types`.

Pure functions of messages and values, no I/O: requests and sampling parameters from protobuf (raising
InvalidRequest naming the field), the server's deltas, scores and model info back to protobuf, and the
gRPC status an exception is reported with (`status_for_exception` over errors.classify, `GrpcStatus`).
`grpc_service.py` is
the service that uses them (and documents how errors and cancellation travel); the conversion lives
here and nowhere else.
"""

from __future__ import annotations

import math
import uuid
from typing import Any

import grpc

from twotower.protos import twotower_v1_pb2 as pb2

from .api_types import (
    SAMPLING_FIELDS,
    GenerateDelta,
    GenerateRequest,
    InvalidRequest,
    ModelInfo,
    PrefixCacheInfo,
    ScoreRequest,
    ScoreResult,
)
from .errors import classify, original

_FINISH_REASONS = {"stop": pb2.FINISH_REASON_STOP, "length": pb2.FINISH_REASON_LENGTH,
                   "abort": pb2.FINISH_REASON_ABORT, "error": pb2.FINISH_REASON_ERROR}  # fmt: skip
class GrpcStatus(Exception):
    """An RPC ended with `code`: raised (after setting the code on the context) to end a call."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details

    def __reduce__(self):  # picklable: Serve ships it to the proxy inside gRPCStatusError
        return (type(self), (self.code, self.details))


def status_for_exception(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and details a server-side exception is reported with (errors.classify)."""
    inner = original(exc)
    if isinstance(inner, GrpcStatus):
        return inner.code, inner.details
    err = classify(exc)
    return grpc.StatusCode[err.kind], err.message


def _mode_name(value: int) -> str:
    try:
        return pb2.Mode.Name(value).removeprefix("MODE_").lower()
    except ValueError:
        known = ", ".join(n for n in pb2.Mode.keys() if n != "MODE_UNSPECIFIED")
        raise InvalidRequest(f"SamplingParams.mode: unknown value {value} (known: {known})") from None


def mode_value(name: str) -> int | None:
    try:
        return pb2.Mode.Value("MODE_" + name.upper())
    except ValueError:
        return None


def sampling_from_proto(msg: pb2.SamplingParams) -> dict[str, Any]:
    """The fields the client set (absent = server default), by SamplingParams name."""
    out: dict[str, Any] = {}
    for field in msg.DESCRIPTOR.fields:
        name = field.name
        if name == "mode":
            if msg.mode != pb2.MODE_UNSPECIFIED:
                out["mode"] = _mode_name(msg.mode)
        elif field.is_repeated:
            if len(getattr(msg, name)):
                out[name] = list(getattr(msg, name))
        elif msg.HasField(name):
            out[name] = getattr(msg, name)
    unknown = sorted(set(out) - set(SAMPLING_FIELDS))
    if unknown:  # the proto grew a field the server does not know
        raise InvalidRequest(f"SamplingParams: field(s) {', '.join(unknown)} not supported by this server")
    return out


def sampling_to_proto(values: dict[str, Any]) -> pb2.SamplingParams:
    """SamplingParams values (e.g. ModelInfo.defaults) as a message; None and unknown names are skipped."""
    msg = pb2.SamplingParams()
    fields = msg.DESCRIPTOR.fields_by_name
    for name, value in values.items():
        if value is None or name not in fields:
            continue
        if name == "mode":
            msg.mode = mode_value(str(value)) or pb2.MODE_UNSPECIFIED
        elif fields[name].is_repeated:
            getattr(msg, name).extend(value)
        else:
            setattr(msg, name, value)
    return msg


def _time_remaining(grpc_context: Any) -> float | None:
    """Seconds left of the call's gRPC deadline, where the context knows it (grpc.aio does; Serve's
    RayServegRPCContext does not, but the proxy cancels the call at the deadline, which aborts it)."""
    fn = getattr(grpc_context, "time_remaining", None)
    if fn is None:
        return None
    try:
        left = fn()
    except Exception:  # pragma: no cover - defensive
        return None
    return None if left is None or not math.isfinite(left) else float(left)


def _prompt(msg: Any, oneof: str) -> tuple[str | None, list[int] | None]:
    which = msg.WhichOneof(oneof)
    if which is None:
        raise InvalidRequest(f"{oneof}: give exactly one of {oneof}_text and {oneof}_token_ids")
    if which.endswith("_text"):
        return getattr(msg, which), None
    return None, list(getattr(msg, which).ids)


def generate_request_from_proto(msg: pb2.GenerateRequest, grpc_context: Any = None) -> GenerateRequest:
    """Raises InvalidRequest naming the field; sampling values are validated by the server."""
    text, ids = _prompt(msg, "prompt")
    deadline = None
    if msg.HasField("deadline_s"):
        deadline = msg.deadline_s
        if not (math.isfinite(deadline) and deadline > 0):
            raise InvalidRequest(f"deadline_s: must be a positive number of seconds (got {deadline!r})")
    left = _time_remaining(grpc_context)
    if left is not None:
        deadline = left if deadline is None else min(deadline, left)
    sampling = sampling_from_proto(msg.sampling) if msg.HasField("sampling") else {}
    return GenerateRequest(request_id=msg.request_id or uuid.uuid4().hex, prompt=text, prompt_token_ids=ids,
                           sampling=sampling, deadline_s=deadline)  # fmt: skip


def chunk_from_delta(d: GenerateDelta) -> pb2.GenerateChunk:
    chunk = pb2.GenerateChunk(
        request_id=d.request_id,
        token_ids=d.token_ids,
        text=d.text,
        finished=d.finished,
        finish_reason=_FINISH_REASONS.get(d.finish_reason or "", pb2.FINISH_REASON_UNSPECIFIED),
        usage=pb2.Usage(
            prompt_tokens=d.prompt_tokens,
            completion_tokens=d.completion_tokens,
            denoiser_forwards=d.denoiser_forwards,
            context_forwards=d.context_forwards,
            tokens_per_forward=d.tokens_per_forward,
            cached_tokens=d.cached_tokens,
        ),
        logprobs=d.logprobs or [],
    )
    if d.seed is not None:
        chunk.seed = d.seed
    return chunk


def score_request_from_proto(msg: pb2.ScoreRequest) -> ScoreRequest:
    text, ids = _prompt(msg, "prompt")
    cont_text, cont_ids = _prompt(msg, "continuation")
    return ScoreRequest(prompt=text, prompt_token_ids=ids, continuation=cont_text, continuation_token_ids=cont_ids)


def score_reply_from_result(r: ScoreResult) -> pb2.ScoreReply:
    return pb2.ScoreReply(token_ids=r.token_ids, logprobs=r.logprobs, total_logprob=r.total_logprob,
                          prompt_tokens=r.prompt_tokens)  # fmt: skip


def model_info_reply(info: ModelInfo) -> pb2.ModelInfoReply:
    modes = [v for v in (mode_value(m) for m in info.modes) if v is not None]
    return pb2.ModelInfoReply(model=info.model, path=info.path, modes=modes, vocab_size=info.vocab_size,
                              max_model_len=info.max_model_len, max_block_size=info.max_block_size,
                              pattern=info.pattern, hidden_size=info.hidden_size,
                              defaults=sampling_to_proto(info.defaults), mask_token_id=info.mask_token_id,
                              eos_token_ids=info.eos_token_ids,
                              prefix_cache=_prefix_cache(info.prefix_cache))  # fmt: skip


def _prefix_cache(c: PrefixCacheInfo | None) -> pb2.PrefixCacheInfo | None:
    return None if c is None else pb2.PrefixCacheInfo(enabled=c.enabled, grid=c.grid, budget_bytes=c.budget_bytes)
