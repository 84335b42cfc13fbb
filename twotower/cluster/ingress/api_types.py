"""What crosses between the ingresses (gRPC, HTTP) and a tower-pair server: plain, serialisable data.

The ingresses convert their wire formats (protobuf, OpenAI JSON) to `GenerateRequest` and turn the
server's `GenerateDelta`s back; conversion lives in the ingresses and nowhere else. A server is anything
with the `ServerClient` methods: the Serve deployment handle adapter, or a fake in tests.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from twotower.cluster.engine.params import SamplingParams
from twotower.cluster.engine.request import RequestOutput, Resume

SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams))


@dataclass
class GenerateRequest:
    request_id: str
    prompt: str | None = None  # text, or
    prompt_token_ids: list[int] | None = None  # token ids (exactly one of the two)
    sampling: dict[str, Any] = field(default_factory=dict)  # SamplingParams fields; absent = default
    deadline_s: float | None = None  # seconds from arrival; the request is aborted past it
    # set only by the ingress's client when it moves a request whose pair died to another replica (no
    # wire format carries it): continue after these already-streamed tokens
    resume: Resume | None = None

    def params(self) -> SamplingParams:
        """SamplingParams from `sampling`; unknown names raise ValueError naming them."""
        unknown = sorted(set(self.sampling) - set(SAMPLING_FIELDS))
        if unknown:
            raise ValueError(f"sampling: unknown field(s) {', '.join(unknown)}")
        return SamplingParams(**self.sampling)

    def prompt_input(self) -> str | list[int]:
        if (self.prompt is None) == (self.prompt_token_ids is None):
            raise ValueError("prompt: give exactly one of prompt (text) and prompt_token_ids")
        return self.prompt if self.prompt is not None else list(self.prompt_token_ids)


@dataclass
class GenerateDelta:
    request_id: str
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None  # stop | length | abort | error
    prompt_tokens: int
    completion_tokens: int
    denoiser_forwards: int
    context_forwards: int
    logprobs: list[float] | None = None
    seed: int | None = None
    error: str | None = None  # set with finish_reason "error"
    token_texts: list[str] | None = None  # each token's own text, when logprobs were asked
    cached_tokens: int = 0  # prompt tokens seated from the prefix cache

    @staticmethod
    def from_output(o: RequestOutput) -> GenerateDelta:
        u = o.usage
        return GenerateDelta(o.request_id, list(o.new_token_ids), o.text, o.finished,
                             None if o.finish_reason is None else o.finish_reason.value, u.prompt_tokens,
                             u.completion_tokens, u.denoiser_forwards, u.context_forwards,
                             None if o.logprobs is None else list(o.logprobs), o.seed,
                             cached_tokens=u.cached_tokens)  # fmt: skip

    @property
    def tokens_per_forward(self) -> float:
        n = self.denoiser_forwards + self.context_forwards
        return self.completion_tokens / n if n else 0.0


@dataclass
class ScoreRequest:
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    continuation: str | None = None
    continuation_token_ids: list[int] | None = None
    top_logprobs: int = 0  # also the N most likely tokens at each position
    echo: bool = False  # also score the prompt's tokens (then the continuation may be empty)


# A position's most likely tokens: (token id, its text, log p), most likely first.
TopLogprobs = list[tuple[int, str, float]]


@dataclass
class ScoreResult:
    token_ids: list[int]  # the continuation's tokens
    logprobs: list[float]  # log p(token | prefix) under the context tower, one per continuation token
    total_logprob: float
    prompt_tokens: int
    token_texts: list[str] | None = None  # each continuation token's own text
    top_logprobs: list[TopLogprobs] | None = None  # per continuation token (top_logprobs > 0)
    prompt_token_ids: list[int] | None = None  # with echo: the prompt's tokens, their texts,
    prompt_token_texts: list[str] | None = None
    prompt_logprobs: list[float | None] | None = None  # log-probabilities (the first is None)
    prompt_top_logprobs: list[TopLogprobs | None] | None = None  # and alternatives (echo and top_logprobs)


@dataclass
class PrefixCacheInfo:
    enabled: bool
    grid: int  # tokens per grid block
    budget_bytes: int


@dataclass
class ModelInfo:
    model: str  # served model name
    path: str  # checkpoint location
    modes: list[str]
    vocab_size: int
    max_model_len: int
    max_block_size: int
    pattern: str  # hybrid layer pattern of each tower
    hidden_size: int
    defaults: dict[str, Any]  # default SamplingParams values (mode, block_size, gamma, ...)
    mask_token_id: int
    eos_token_ids: list[int]
    prefix_cache: PrefixCacheInfo | None = None


class InvalidRequest(ValueError):
    """Bad input: ingresses map it to INVALID_ARGUMENT / HTTP 400 with this message."""


class ServerClient(Protocol):
    def generate(self, req: GenerateRequest) -> AsyncIterator[GenerateDelta]: ...

    async def score(self, req: ScoreRequest) -> ScoreResult: ...

    async def model_info(self) -> ModelInfo: ...

    async def tokenize(self, text: str) -> list[int]: ...

    async def detokenize(self, token_ids: list[int]) -> str: ...

    async def tokenizer_info(self) -> dict[str, Any]: ...

    async def abort(self, request_id: str) -> None: ...
