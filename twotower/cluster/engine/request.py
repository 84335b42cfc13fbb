"""Requests as the engine tracks them, and the deltas it streams back."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from .params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_tokens
    ABORT = "abort"  # cancelled by the caller
    ERROR = "error"  # the engine failed this request


@dataclass
class Scores:
    """Context-tower log-probabilities of a (prompt, continuation) pair, teacher-forced.

    logprobs[j]: log p(continuation[j] | prompt, continuation[:j]).
    top[j]: the `top` most likely (token id, log p) at that position, most likely first (None: top=0).
    prompt_logprobs / prompt_top: the same for the prompt's tokens when echo was asked (None otherwise);
    the first prompt token has no prefix, so its entries are None."""

    logprobs: list[float]
    top: list[list[tuple[int, float]]] | None = None
    prompt_logprobs: list[float | None] | None = None
    prompt_top: list[list[tuple[int, float]] | None] | None = None


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    denoiser_forwards: int = 0  # batched forwards this request took part in
    context_forwards: int = 0  # prefill counts as one
    cached_tokens: int = 0  # leading prompt tokens seated from the prefix cache (not read again)

    @property
    def tokens_per_forward(self) -> float:
        """Generated tokens per forward of either tower (AR: 1.0)."""
        n = self.denoiser_forwards + self.context_forwards
        return self.completion_tokens / n if n else 0.0

    @property
    def tokens_per_denoiser_forward(self) -> float:
        return self.completion_tokens / self.denoiser_forwards if self.denoiser_forwards else 0.0

    @property
    def tokens_per_context_forward(self) -> float:
        return self.completion_tokens / self.context_forwards if self.context_forwards else 0.0


@dataclass
class Resume:
    """Where a request continues from when it moves to another engine (its pair died): the tokens it
    already streamed (whole committed blocks, so the block grid stays where it was), their
    log-probabilities, how many characters of text the client has, and the forwards spent so far.

    The engine reads prompt + token_ids in one prefill and goes on generating; per-token seeds depend on
    the position only (sampler.mix_seed), so with the same seed the continuation is the one the first
    engine would have produced."""

    token_ids: list[int]
    logprobs: list[float] | None = None
    text_chars: int = 0
    denoiser_forwards: int = 0
    context_forwards: int = 0
    # how many tokens each streamed delta carried: the detokenizer is replayed in the same pieces, so
    # text held back at a cut character is held back the same way (None: one piece)
    chunks: list[int] | None = None


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int  # the effective seed (params.seed or drawn by the engine)
    eos_token_ids: tuple[int, ...] = ()
    status: Status = Status.WAITING
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    usage: Usage = field(default_factory=Usage)
    first_token_time: float | None = None

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def sequence(self) -> list[int]:
        """Prompt and generated tokens: what a lane prefills when it admits the request (a resumed
        request arrives with tokens generated elsewhere)."""
        return self.prompt_ids + self.output_ids

    def finish(self, reason: FinishReason) -> None:
        self.status = Status.FINISHED
        self.finish_reason = reason

    def append(self, tokens: list[int], logprobs: list[float] | None = None) -> list[int]:
        """Append generated tokens one by one, stopping exactly at EOS / a stop token / max_tokens.
        Returns the tokens actually kept (a block may be cut inside)."""
        kept: list[int] = []
        stops = set(self.params.stop_token_ids)
        if not self.params.ignore_eos:
            stops.update(self.eos_token_ids)
        for j, tok in enumerate(tokens):
            if self.finished:
                break
            self.output_ids.append(tok)
            if logprobs is not None:
                self.output_logprobs.append(logprobs[j])
            kept.append(tok)
            if tok in stops:
                self.finish(FinishReason.STOP)
            elif len(self.output_ids) >= self.params.max_tokens:
                self.finish(FinishReason.LENGTH)
        if kept and self.first_token_time is None:
            self.first_token_time = time.monotonic()
        self.usage.completion_tokens = len(self.output_ids)
        return kept


@dataclass
class RequestOutput:
    """One streamed delta."""

    request_id: str
    new_token_ids: list[int]
    text: str  # text delta (empty without a tokenizer)
    finished: bool
    finish_reason: FinishReason | None
    usage: Usage
    logprobs: list[float] | None = None
    seed: int | None = None
