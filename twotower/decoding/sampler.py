"""Next-token sampling for the AR modes: greedy, or temperature / top-k / top-p with a per-row seed."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class RowSampling:
    """Sampling settings of the rows of one batched call (lists in row order)."""

    temperature: list[float]
    top_k: list[int]
    top_p: list[float]
    seeds: list[int]  # per-row seed for this token (request seed mixed with the token index)
    logprobs: bool = False

    @staticmethod
    def greedy(n: int) -> RowSampling:
        return RowSampling([0.0] * n, [0] * n, [1.0] * n, [0] * n)


def sample(logits: Tensor, rs: RowSampling) -> tuple[Tensor, Tensor | None]:
    """logits [b, V] float32 -> (token ids [b] int64, log-probabilities of those tokens [b] or None).

    The reported log-probability is under the untempered distribution."""
    logits = logits.float()
    out = logits.argmax(-1)
    for r, temp in enumerate(rs.temperature):
        if temp <= 0:
            continue
        # float64, shifted so the top logit is 0: the softmax is finite for any temp > 0 (1e-300 included;
        # in float32 such a temperature would round to 0 and the top logit to 0 / 0)
        row = (logits[r].double() - logits[r].max()) / temp
        if rs.top_k[r] > 0:
            kth = torch.topk(row, min(rs.top_k[r], row.shape[-1])).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        if rs.top_p[r] < 1.0:
            probs_sorted, order = torch.sort(torch.softmax(row, -1), descending=True)
            # keep the smallest prefix whose mass reaches top_p (always at least one token)
            drop = (torch.cumsum(probs_sorted, -1) - probs_sorted) >= rs.top_p[r]
            row = row.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
        g = torch.Generator(device="cpu").manual_seed(rs.seeds[r])
        probs = torch.softmax(row, -1).cpu()
        out[r] = torch.multinomial(probs, 1, generator=g).to(out.device)[0]
    lp = torch.log_softmax(logits, -1).gather(-1, out[:, None])[:, 0] if rs.logprobs else None
    return out, lp


def mix_seed(seed: int, index: int) -> int:
    """A per-token seed from a request seed and a token/step index (splitmix64 finaliser)."""
    z = (seed + 0x9E3779B97F4A7C15 * (index + 1)) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF
