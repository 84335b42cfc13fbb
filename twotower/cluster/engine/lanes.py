"""Decoding modes as lanes: a lane is a batch of running requests of one mode (and one block size),
stepped together. Requests join (prefill) and leave between steps; every row of a lane may be at a
different point of its block.

A step is one forward of the tower that drives the mode, in two phases so that lanes pipeline across
the two towers: `launch()` submits the driving forward and returns at once; `finish()` waits for it,
applies the decoding rule and submits the follow-up work (e.g. the context tower reading completed
blocks) without waiting. With a remote executor, lane A's context-tower work then overlaps lane B's
denoiser forward.
    diffusion  denoiser forward on every row; rows whose block is complete are committed and read by
               the context tower (one batched extension for those rows)
    lossless   like diffusion, but a complete draft [known token, d1..] is verified by the context
               tower in the forward that reads it; the longest prefix agreeing with greedy AR is kept,
               plus the context tower's next token (the known token of the next draft)
    ar         one context-tower decode step
    mock_ar    one denoiser mock-AR step, then the context tower reads the token it was given
"""

from __future__ import annotations

import abc

import torch
from torch import Tensor

from twotower.decoding.sampler import RowSampling, mix_seed
from twotower.decoding.unmask import select_commits

from .executor import Future, TowerExecutor
from .request import Request

# (request, tokens kept, their logprobs or None)
Event = tuple[Request, list[int], list[float] | None]


def _row_sampling(reqs: list[Request]) -> RowSampling:
    return RowSampling(
        temperature=[r.params.temperature for r in reqs],
        top_k=[r.params.top_k for r in reqs],
        top_p=[r.params.top_p for r in reqs],
        seeds=[mix_seed(r.seed, len(r.output_ids)) for r in reqs],
        logprobs=any(r.params.logprobs for r in reqs),
    )


def _emit(req: Request, tokens: list[int], logprobs: list[float] | None) -> Event:
    kept = req.append(tokens, logprobs if req.params.logprobs else None)
    return req, kept, (logprobs[: len(kept)] if (logprobs is not None and req.params.logprobs) else None)


def _lp(out, j: int) -> list[float] | None:
    return None if out.logprobs is None else [float(out.logprobs[j])]


class Lane(abc.ABC):
    uses_denoiser = True

    def __init__(self, name: str, executor: TowerExecutor, mask_id: int) -> None:
        self.name, self.ex, self.mask_id = name, executor, mask_id
        self.rows: list[Request] = []

    def __len__(self) -> int:
        return len(self.rows)

    @abc.abstractmethod
    def admit(self, reqs: list[Request]) -> list[Event]:
        """Prefill new requests into the lane (may already produce tokens)."""

    @abc.abstractmethod
    def launch(self) -> Future:
        """Submit this step's driving forward over every row."""

    @abc.abstractmethod
    def finish(self, pending: Future) -> list[Event]:
        """Wait for the driving forward, apply the mode's rule, submit follow-up work."""

    def step(self) -> list[Event]:
        return self.finish(self.launch())

    def _prefill(self, reqs: list[Request], prompts: list[list[int]], sampling: RowSampling | None):
        admitted = self.ex.add_rows(self.name, prompts, sampling, self.uses_denoiser).result()
        for r, n in zip(reqs, admitted.cached, strict=True):
            r.usage.cached_tokens = min(n, r.usage.prompt_tokens)  # a resumed sequence counts its prompt only
        return admitted.sampled

    def drop_finished(self) -> list[Request]:
        """Remove finished rows (and their state) at once; returns them."""
        gone = [r for r in self.rows if r.finished]
        if gone:
            keep = [i for i, r in enumerate(self.rows) if not r.finished]
            self.ex.keep_rows(self.name, keep)
            self._keep(keep)
            self.rows = [self.rows[i] for i in keep]
        return gone

    def _keep(self, keep: list[int]) -> None:
        """Subclasses: select per-row decoding data."""


class ARLane(Lane):
    """Context tower alone. pending[r]: the last sampled token, not yet read by the context tower."""

    uses_denoiser = False

    def __init__(self, *a) -> None:
        super().__init__(*a)
        self.pending: list[int] = []

    def admit(self, reqs):
        out = self._prefill(reqs, [r.sequence for r in reqs], _row_sampling(reqs))
        self.rows += reqs
        events = []
        for j, r in enumerate(reqs):
            r.usage.context_forwards += 1
            tok = int(out.ids[j])
            self.pending.append(tok)
            events.append(_emit(r, [tok], _lp(out, j)))
        return events

    def launch(self):
        return self.ex.decode(self.name, torch.tensor(self.pending), _row_sampling(self.rows))

    def finish(self, pending):
        out = pending.result()
        events = []
        for j, r in enumerate(self.rows):
            r.usage.context_forwards += 1
            self.pending[j] = int(out.ids[j])
            events.append(_emit(r, [self.pending[j]], _lp(out, j)))
        return events

    def _keep(self, keep):
        self.pending = [self.pending[i] for i in keep]


class MockARLane(ARLane):
    """The denoiser predicts the next token from the last committed one over the context tower's state
    of everything before it; the context tower then reads that last token (so it lags by one)."""

    uses_denoiser = True

    def admit(self, reqs):
        self._prefill(reqs, [r.sequence[:-1] for r in reqs], None)
        for r in reqs:
            r.usage.context_forwards += 1 if len(r.sequence) > 1 else 0
            self.pending.append(r.sequence[-1])
        self.rows += reqs
        return []

    def launch(self):
        return self.ex.mock_ar(self.name, torch.tensor(self.pending), _row_sampling(self.rows))

    def finish(self, pending):
        out = pending.result()
        self.ex.decode(self.name, torch.tensor(self.pending), None)  # the context tower catches up
        events = []
        for j, r in enumerate(self.rows):
            r.usage.denoiser_forwards += 1
            r.usage.context_forwards += 1
            self.pending[j] = int(out.ids[j])
            events.append(_emit(r, [self.pending[j]], _lp(out, j)))
        return events


class DiffusionLane(Lane):
    """Mask diffusion. xt [b, S]: each row's current block; step_idx[r]: denoiser steps taken on it."""

    def __init__(self, name: str, executor: TowerExecutor, mask_id: int, block_size: int) -> None:
        super().__init__(name, executor, mask_id)
        self.S = block_size
        self.xt = torch.empty(0, block_size, dtype=torch.long)
        self.step_idx = torch.empty(0, dtype=torch.long)
        self.logp = torch.empty(0, block_size)  # log-confidence of each committed position

    def _new_blocks(self, n: int) -> Tensor:
        return torch.full((n, self.S), self.mask_id, dtype=torch.long)

    def _append_rows(self, reqs: list[Request], blocks: Tensor) -> None:
        self.rows += reqs
        self.xt = torch.cat([self.xt, blocks])
        self.step_idx = torch.cat([self.step_idx, torch.zeros(len(reqs), dtype=torch.long)])
        self.logp = torch.cat([self.logp, torch.zeros(len(reqs), self.S)])

    def admit(self, reqs):
        self._prefill(reqs, [r.sequence for r in reqs], None)
        for r in reqs:
            r.usage.context_forwards += 1
        self._append_rows(reqs, self._new_blocks(len(reqs)))
        return []

    def _keep(self, keep):
        idx = torch.tensor(keep, dtype=torch.long)
        self.xt, self.step_idx, self.logp = self.xt[idx], self.step_idx[idx], self.logp[idx]

    def _masked(self) -> Tensor:
        """Positions still to be denoised [b, S] bool."""
        return self.xt == self.mask_id

    def launch(self):
        temp = torch.tensor([r.params.temperature for r in self.rows], dtype=torch.float64)  # 1e-300 stays > 0
        t = self._masked().float().mean(-1)  # per-row masked fraction
        seeds = [mix_seed(r.seed, len(r.output_ids) * 1024 + int(s))
                 for r, s in zip(self.rows, self.step_idx, strict=True)]  # fmt: skip
        return self.ex.denoise(self.name, self.xt, t, self.mask_id, temp, seeds)

    def _unmask(self, pending: Future) -> Tensor:
        """Commit this step's positions; returns the rows whose block is now complete [b] bool."""
        pred, conf = pending.result()
        steps = torch.tensor([r.params.steps_per_block for r in self.rows])
        gamma = torch.tensor([r.params.gamma for r in self.rows], dtype=torch.float32)
        commit = select_commits(self._masked(), conf, self.step_idx, steps, gamma)
        self.xt = torch.where(commit, pred, self.xt)
        self.logp = torch.where(commit, conf.clamp_min(1e-30).log(), self.logp)
        self.step_idx += 1
        for r in self.rows:
            r.usage.denoiser_forwards += 1
        return ~self._masked().any(-1)

    def finish(self, pending):
        done = self._unmask(pending)
        if not bool(done.any()):
            return []
        events = []
        for j in done.nonzero().flatten().tolist():
            events.append(_emit(self.rows[j], self.xt[j].tolist(), self.logp[j].tolist()))
        # the context tower reads the completed blocks of rows that go on
        n_valid = torch.where(done & torch.tensor([not r.finished for r in self.rows]), self.S, 0)
        if bool((n_valid > 0).any()):
            self.ex.extend(self.name, self.xt.clone(), n_valid)
            for j in (n_valid > 0).nonzero().flatten().tolist():
                self.rows[j].usage.context_forwards += 1
        self.xt[done] = self.mask_id
        self.step_idx[done] = 0
        return events


class LosslessLane(DiffusionLane):
    """Drafts [y, MASK x (S-1)] with the denoiser, y being the context tower's known greedy next token;
    the context tower verifies the draft while reading it. Output = greedy AR of the context tower."""

    def _masked(self) -> Tensor:
        # slot 0 holds the known token, which may itself be the mask id (the AR head can emit it): it is
        # never denoised, or the draft would replace a token that greedy AR already chose
        masked = self.xt == self.mask_id
        masked[:, 0] = False
        return masked

    def admit(self, reqs):
        out = self._prefill(reqs, [r.sequence for r in reqs], RowSampling.greedy(len(reqs)))
        events = []
        blocks = self._new_blocks(len(reqs))
        for j, r in enumerate(reqs):
            r.usage.context_forwards += 1
            y = int(out.ids[j])
            blocks[j, 0] = y
            events.append(_emit(r, [y], None))
        self._append_rows(reqs, blocks)
        return events

    def finish(self, pending):
        done = self._unmask(pending)
        live = done & torch.tensor([not r.finished for r in self.rows])
        if not bool(live.any()):
            return []
        n_valid = torch.where(live, self.S, 0)
        greedy = self.ex.verify(self.name, self.xt.clone(), n_valid).result()  # AR token after position j
        keep = torch.zeros(len(self.rows), dtype=torch.long)
        events = []
        for j in live.nonzero().flatten().tolist():
            r = self.rows[j]
            r.usage.context_forwards += 1
            draft, ar = self.xt[j].tolist(), greedy[j].tolist()
            k = 1  # slot 0 is the already-emitted known token
            while k < self.S and draft[k] == ar[k - 1]:
                k += 1
            keep[j] = k
            events.append(_emit(r, draft[1:k] + [ar[k - 1]], None))
            self.xt[j] = self.mask_id
            self.xt[j, 0] = ar[k - 1]
            self.step_idx[j] = 0
        self.ex.rewind(self.name, keep)
        return events
