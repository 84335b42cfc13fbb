"""The engine: requests in, streamed deltas out. The step loop reads like the algorithm:

    step():  drop aborted rows -> schedule (admit, pick lanes) -> prefill new rows -> step each lane
             -> turn the tokens each request kept into deltas -> release finished requests

It drives the towers only through a TowerExecutor, so the same engine runs in-process or over Ray.
`AsyncEngine` (async_engine.py) wraps it for asyncio servers.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from twotower.decoding import MASK_TOKEN_ID

from .errors import LaneFailed, LaneOpError, TowersUnavailable
from .executor import TowerExecutor
from .lanes import ARLane, DiffusionLane, Event, Lane, LosslessLane, MockARLane
from .output import RequestText
from .params import MAX_TOP_LOGPROBS, ModelLimits, SamplingParams
from .request import FinishReason, Request, RequestOutput, Resume, Scores, Usage
from .scheduler import Scheduler, parse_lane
from .tokenizer import TokenizerLike

log = logging.getLogger(__name__)


@dataclass
class StepStats:
    """What one engine step did (for metrics hooks)."""

    seconds: float
    lanes: list[str]
    rows: int  # running requests after admission
    new_tokens: int
    admitted: int
    finished: int
    waiting: int


@dataclass
class EngineHooks:
    on_step: list[Callable[[StepStats], None]] = field(default_factory=list)
    on_finish: list[Callable[[Request], None]] = field(default_factory=list)


class Engine:
    def __init__(
        self,
        executor: TowerExecutor,
        limits: ModelLimits,
        *,
        mask_token_id: int = MASK_TOKEN_ID,
        eos_token_ids: tuple[int, ...] = (),
        tokenizer: TokenizerLike | None = None,
        max_num_seqs: int = 32,
        max_prefills_per_step: int = 16,
        micro_batches: int = 1,
        pipeline: bool = True,
        hooks: EngineHooks | None = None,
    ) -> None:
        self.ex = executor
        self.limits = limits
        self.mask_id = mask_token_id
        self.eos_ids = tuple(eos_token_ids)
        self.tokenizer = tokenizer
        self.scheduler = Scheduler(max_num_seqs, max_prefills_per_step, micro_batches)
        self.pipeline = pipeline  # False: each lane's work completes before the next lane starts
        self.hooks = hooks or EngineHooks()
        self.lanes: dict[str, Lane] = {}
        self.outputs: dict[str, RequestText] = {}
        self._ids = itertools.count()
        self.failures: list[tuple[Request, LaneFailed]] = []  # failed by a lane error; see take_failures
        self._lock = threading.RLock()  # step() vs add/abort from other threads

    # ---- requests --------------------------------------------------------------------------------
    def add_request(
        self, prompt: str | list[int], params: SamplingParams | None = None, request_id: str | None = None,
        resume: Resume | None = None,
    ) -> Request:  # fmt: skip
        """Validate and queue a request; raises ValueError naming the bad field. With `resume` (a request
        moved here from an engine that died) it continues after the tokens it already streamed: pass the
        seed it reported as params.seed to continue a sampled stream."""
        params = params or SamplingParams()
        prompt_ids = self._tokens(prompt, "prompt")
        params.validate(self.limits, len(prompt_ids))
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        req = Request(rid, prompt_ids, params, seed, self.eos_ids)
        req.usage.prompt_tokens = len(prompt_ids)
        if resume is not None:
            self._resume(req, resume)
        output = RequestText(req, self.tokenizer, *((resume.text_chars, resume.chunks) if resume else ()))
        with self._lock:
            self.scheduler.add(req)
            self.outputs[rid] = output
        return req

    def _resume(self, req: Request, resume: Resume) -> None:
        if isinstance(resume.token_ids, str):  # _tokens would tokenize text; a resume carries what was streamed
            raise ValueError("resume.token_ids: must be token ids, not text")
        ids = self._tokens(resume.token_ids, "resume.token_ids")
        t = resume.text_chars
        if type(t) is not int or t < 0:
            raise ValueError(f"resume.text_chars: must be a non-negative integer (got {t!r})")
        if len(ids) >= req.params.max_tokens:
            raise ValueError(f"resume.token_ids: {len(ids)} tokens leave nothing of max_tokens "
                             f"{req.params.max_tokens} to generate")  # fmt: skip
        if resume.logprobs is not None and len(resume.logprobs) != len(ids):
            raise ValueError("resume.logprobs: must have one entry per resumed token")
        c = resume.chunks
        if c is not None and (any(type(n) is not int or n < 1 for n in c) or sum(c) != len(ids)):
            raise ValueError("resume.chunks: must be positive sizes that add up to the resumed tokens")
        req.output_ids = ids
        req.output_logprobs = list(resume.logprobs or [])
        req.usage.completion_tokens = len(ids)
        req.usage.denoiser_forwards = resume.denoiser_forwards
        req.usage.context_forwards = resume.context_forwards

    def report_idle(self) -> None:
        """Tell the step hooks what the engine holds between steps (gauges must not keep the last busy
        step's values once it has gone idle or a request was aborted)."""
        stats = StepStats(0.0, [], self.scheduler.num_running, 0, 0, 0, self.scheduler.num_waiting)
        for hook in self.hooks.on_step:
            hook(stats)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Cancel a request; its slot and state are freed before this returns."""
        with self._lock:
            req = self.scheduler.abort(request_id)
            if req is None:
                return None
            self._drop_finished()
            return self._finalise(req)

    def score(self, prompt: str | list[int], continuation: str | list[int]) -> tuple[list[int], list[float], int]:
        """(continuation token ids, their log-probabilities under the context tower, prompt tokens).
        Raises ValueError naming the bad field."""
        p_ids, c_ids, scores = self.score_tokens(prompt, continuation)
        return c_ids, scores.logprobs, len(p_ids)

    def score_tokens(self, prompt: str | list[int], continuation: str | list[int], top: int = 0,
                     echo: bool = False) -> tuple[list[int], list[int], Scores]:  # fmt: skip
        """(prompt ids, continuation ids, request.Scores): with `top`, the most likely tokens at each
        position; with `echo`, the prompt's tokens scored too (then the continuation may be empty)."""
        p_ids = self._tokens(prompt, "prompt")
        c_ids = self._tokens(continuation, "continuation")
        if not p_ids:
            raise ValueError("prompt: must contain at least one token")
        if not c_ids and not echo:
            raise ValueError("continuation: must contain at least one token")
        if not 0 <= top <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs: at most {MAX_TOP_LOGPROBS} top alternatives (got {top})")
        if len(p_ids) + len(c_ids) > self.limits.max_model_len:
            raise ValueError(
                f"continuation: prompt + continuation exceed the context limit {self.limits.max_model_len}"
            )
        with self._lock:
            return p_ids, c_ids, self.ex.score(p_ids, c_ids, top, echo).result()

    def encode(self, text: str, name: str = "prompt") -> list[int]:
        """Token ids of `text`; ValueError naming `name` when it cannot be tokenized."""
        return self._tokens(text, name)

    def _tokens(self, x: str | list[int], name: str) -> list[int]:
        if isinstance(x, str):
            if self.tokenizer is None:
                raise ValueError(f"{name}: text needs a tokenizer; pass token ids")
            try:
                x.encode("utf-8")
            except UnicodeEncodeError as e:  # a lone surrogate (JSON "\ud800"): no UTF-8 text to tokenize
                raise ValueError(f"{name}: not valid Unicode text ({e.reason} at character {e.start})") from None
            return self.tokenizer.encode(x)
        ids = list(x)
        if any(type(t) is not int or not 0 <= t < self.limits.vocab_size for t in ids):
            raise ValueError(f"{name}: token ids must be integers in [0, {self.limits.vocab_size})")
        return ids

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def fail_all(self, error: BaseException) -> list[Request]:
        """Finish every request in flight with FinishReason.ERROR (the towers failed) and forget the
        lanes without touching the executor; returns the failed requests."""
        with self._lock:
            failed = list(self.scheduler.waiting) + list(self.scheduler.running.values())
            self.scheduler.waiting.clear()
            for r in failed:
                r.finish(FinishReason.ERROR)
            self.scheduler.release(failed)
            for key in list(self.lanes):
                try:
                    self.ex.close_lane(key)
                except Exception:  # a dead executor cannot close anything; its state is gone anyway
                    pass
            self.lanes.clear()
            for r in failed:
                self.outputs.pop(r.request_id, None)
                for hook in self.hooks.on_finish:
                    hook(r)
            return failed

    # ---- the loop --------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        with self._lock:
            t0 = time.perf_counter()
            sched = self.scheduler.schedule({k: len(v) for k, v in self.lanes.items()})
            events: list[Event] = []
            for key, reqs in sched.admit.items():
                events += self._guarded(key, lambda key=key, reqs=reqs: self._lane(key).admit(reqs), reqs) or []
            self._check()
            if self.pipeline:  # every lane's driving forward is submitted before any is waited for
                launched = [(key, self._guarded(key, self.lanes[key].launch)) for key in sched.step
                            if key in self.lanes]  # fmt: skip
                for key, pending in launched:
                    if key in self.lanes:
                        events += self._guarded(key, lambda key=key, p=pending: self.lanes[key].finish(p)) or []
            else:
                for key in sched.step:
                    if key in self.lanes:
                        events += self._guarded(key, self.lanes[key].step) or []
                    self._check(self.ex.drain)
            outs = self._deltas(events)
            finished = self._drop_finished()
            outs += [o for o in map(self._finalise, finished) if o is not None]
            stats = StepStats(time.perf_counter() - t0, sched.step, self.scheduler.num_running,
                              sum(len(e[1]) for e in events), sum(map(len, sched.admit.values())),
                              len(finished), self.scheduler.num_waiting)  # fmt: skip
        for hook in self.hooks.on_step:
            hook(stats)
        return outs

    # ---- fault isolation: an op that raises fails its lane only ----------------------------------------
    def _guarded(self, key: str, fn: Callable, admitting: list[Request] = ()):
        """fn() for lane `key`. If it raises (anything but TowersUnavailable, which means nothing on this
        executor can run), the lane's requests fail and the lane is dropped; returns None then."""
        try:
            return fn()
        except TowersUnavailable:
            raise
        except Exception as e:
            self._fail_lane(key, e, admitting)
            return None

    def _check(self, collect: Callable[[], None] | None = None) -> None:
        """executor.check() (or drain()): a failed unwaited op fails its lane, then collection goes on."""
        while True:
            try:
                return (collect or self.ex.check)()
            except LaneOpError as e:  # an unwaited op of one lane failed (remote executors)
                if e.lane in self.lanes:
                    self._fail_lane(e.lane, e)

    def _fail_lane(self, key: str, error: BaseException, admitting: list[Request] = ()) -> None:
        error_id = uuid.uuid4().hex[:12]
        log.error("lane %s failed, its requests fail with error id %s", key, error_id, exc_info=error)
        lane = self.lanes.pop(key, None)
        reqs = list(lane.rows if lane is not None else []) + [r for r in admitting if lane is None or r not in
                                                               lane.rows]  # fmt: skip
        try:
            self.ex.close_lane(key)  # frees its slots; the lane's state may be half-written
        except TowersUnavailable:
            raise
        except Exception:
            log.exception("lane %s: close_lane after a failure also failed", key)
        for r in reqs:
            if not r.finished:
                r.finish(FinishReason.ERROR)
        self.scheduler.release(reqs)
        for r in reqs:
            if self.outputs.pop(r.request_id, None) is not None:
                self.failures.append((r, LaneFailed(key, error_id)))
                for hook in self.hooks.on_finish:
                    hook(r)

    def take_failures(self) -> list[tuple[Request, LaneFailed]]:
        """Requests failed by a lane error since the last call, with the error each one's consumer gets."""
        with self._lock:
            out, self.failures = self.failures, []
            return out

    def _lane(self, key: str) -> Lane:
        if key not in self.lanes:
            mode, size = parse_lane(key)
            if mode == "diffusion":
                self.lanes[key] = DiffusionLane(key, self.ex, self.mask_id, size)
            elif mode == "lossless":
                self.lanes[key] = LosslessLane(key, self.ex, self.mask_id, size)
            elif mode == "ar":
                self.lanes[key] = ARLane(key, self.ex, self.mask_id)
            else:
                self.lanes[key] = MockARLane(key, self.ex, self.mask_id)
        return self.lanes[key]

    def _deltas(self, events: list[Event]) -> list[RequestOutput]:
        """One delta per request with the tokens it kept this step. A request may have several events in
        one step (admitted into a busy lane, then stepped with it): they are merged in order, so the
        delta's tokens are exactly the tail of output_ids that the step appended."""
        merged: dict[str, list] = {}
        for req, kept, logprobs in events:
            if not kept:
                continue
            if req.request_id not in merged:
                merged[req.request_id] = [req, [], [] if logprobs is not None else None]
            m = merged[req.request_id]
            m[1] += kept
            m[2] = m[2] + logprobs if (m[2] is not None and logprobs is not None) else None
        outs = []
        for req, kept, logprobs in merged.values():
            if req.request_id not in self.outputs:
                continue
            out = self.outputs[req.request_id]
            n_before = len(req.output_ids) - len(kept)
            text = out.delta(kept)  # a stop string may finish the request and drop tokens
            kept = req.output_ids[n_before:]
            logprobs = logprobs[: len(kept)] if logprobs is not None else None
            out.final_sent = req.finished
            outs.append(RequestOutput(req.request_id, kept, text, req.finished, req.finish_reason,
                                      _copy(req.usage), logprobs, req.seed))  # fmt: skip
        return outs

    def _drop_finished(self) -> list[Request]:
        gone: list[Request] = []
        for key, lane in list(self.lanes.items()):
            gone += lane.drop_finished()
            if not lane.rows:
                self.ex.close_lane(key)
                del self.lanes[key]
        # aborted requests may already be out of their lane's bookkeeping
        self.scheduler.release(gone)
        return gone

    def _finalise(self, req: Request) -> RequestOutput | None:
        out = self.outputs.pop(req.request_id, None)
        for hook in self.hooks.on_finish:
            hook(req)
        if out is None or out.final_sent:
            return None
        text = out.delta([]) if out.detok is not None else ""
        return RequestOutput(req.request_id, [], text, True, req.finish_reason, _copy(req.usage), None, req.seed)

    # ---- convenience -----------------------------------------------------------------------------
    def generate(self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams]) -> list[Request]:
        """Run prompts to completion (blocking); returns the finished requests in prompt order."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        reqs = [self.add_request(p, sp) for p, sp in zip(prompts, plist, strict=True)]
        while any(not r.finished for r in reqs):
            self.step()
        return reqs


def _copy(u: Usage) -> Usage:
    return dataclasses.replace(u)
