"""The block-diffusion decoding rule (confidence-threshold unmasking), batched with per-row parameters.

Per denoiser step, for each row with n masked positions at step s of T:
    x0 prediction over the vocabulary without the mask token; greedy, or Gumbel-max sampling at a
    temperature while the confidence always comes from the untempered distribution;
    k = number of masked positions with confidence strictly above gamma, at least 1,
        at least ceil(n / (T - s)) (so the block finishes within T steps), all of them at s = T - 1;
    commit the k most confident masked positions (ties: lower position first); the rest stay masked.
Committed positions are never touched again.
"""

from __future__ import annotations

import torch
from torch import Tensor

# The mask token of every TwoTower tokenizer this project writes or reads (special ids: pad 0, bos 1,
# eos 2, mask 3); the denoiser reads it at masked positions and x0 prediction never proposes it.
MASK_TOKEN_ID = 3


def gumbel_noise(shape: tuple[int, ...], seeds: list[int], device: torch.device) -> Tensor:
    """Standard Gumbel noise [b, ...], row r drawn from its own generator seeded with seeds[r]
    (so a row's samples do not depend on the rest of the batch)."""
    rows = []
    for s in seeds:
        g = torch.Generator(device="cpu").manual_seed(s)
        u = torch.rand(shape[1:], generator=g, dtype=torch.float64)
        rows.append(-torch.log(-torch.log(u.clamp_min(1e-20))))
    return torch.stack(rows).to(device=device, dtype=torch.float32)


def x0_predict(
    logits: Tensor,  # [b, S, V] float32
    mask_id: int,
    temperature: Tensor,  # [b] float, on the host (a device tensor costs a read); 0 = greedy
    seeds: list[int] | None = None,  # per-row seed for this step (needed when any temperature > 0)
) -> tuple[Tensor, Tensor]:
    """Returns (pred [b, S] int64, conf [b, S] float32: untempered probability of pred)."""
    logits = logits.float().clone()
    logits[..., mask_id] = float("-inf")  # the mask token is never predicted
    logp = torch.log_softmax(logits, dim=-1)
    pred = logp.argmax(-1)
    hot = temperature.cpu() > 0  # temperatures come from the host: no device read
    if bool(hot.any()):
        if seeds is None:
            raise ValueError("x0_predict: seeds are required when sampling")
        rows = hot.nonzero().flatten()
        temp = temperature.cpu()[rows].double().to(logits.device)[:, None, None]
        idx = rows.to(logits.device)
        noise = gumbel_noise(tuple(logits[idx].shape), [seeds[i] for i in rows.tolist()], logits.device)
        # logp / temp in float64, not logits / temp: the same distribution, <= 0 with a finite top, so a
        # tiny temperature (1e-300) gives no inf - inf
        pred[idx] = (torch.log_softmax(logp[idx].double() / temp, dim=-1) + noise).argmax(-1)
    conf = logp.gather(-1, pred[..., None]).squeeze(-1).exp()
    return pred, conf


def commit_counts(masked: Tensor, conf: Tensor, step: Tensor, steps: Tensor, gamma: Tensor) -> Tensor:
    """How many masked positions each row commits this step. masked/conf [b, S]; step/steps/gamma [b]."""
    n = masked.sum(-1)
    above = ((conf > gamma[:, None]) & masked).sum(-1)
    k = above.clamp(min=1)
    remaining = (steps - step).clamp(min=1)
    floor = (n + remaining - 1) // remaining  # ceil(n / (T - s))
    k = torch.minimum(torch.maximum(k, floor), n)
    return torch.where(step >= steps - 1, n, k)


def select_commits(masked: Tensor, conf: Tensor, step: Tensor, steps: Tensor, gamma: Tensor) -> Tensor:
    """Bool [b, S]: the masked positions to commit now (the k most confident of each row)."""
    k = commit_counts(masked, conf, step, steps, gamma)
    score = torch.where(masked, conf.float(), torch.full_like(conf, -1.0, dtype=torch.float32))
    # stable descending sort: equal confidences keep position order, so ties go to lower positions
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return masked & (rank < k[:, None])
