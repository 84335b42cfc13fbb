"""Decoding metrics for a freshly trained pair of towers, without the serving engine (towers must not import
cluster): the mask-diffusion loop batched over prompts of equal length, greedy, with the decoding rule of
`twotower.decoding` (the one the engine uses: confidence threshold gamma, at least one commit per step,
schedule floor, last step commits all, ties to the lower position).

Reported: tokens per denoiser forward (per row: forwards in which the row still had masked positions) and
agreement with the context tower's greedy AR continuation (token match rate, first divergence), for mask
diffusion at several gammas and for greedy mock-AR."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from twotower.decoding import select_commits, x0_predict

from ..context import ContextTower
from ..denoiser import DenoiserTower
from .denoiser import MASK_ID, greedy_continuations


@torch.no_grad()
def diffusion_generate(
    ctx: ContextTower,
    den: DenoiserTower,
    prompts: Tensor,
    max_new: int,
    block: int = 16,
    gamma: float = 0.8,
    steps: int | None = None,
    mask_id: int = MASK_ID,
) -> tuple[Tensor, int]:
    """Greedy mask diffusion of prompts [b, P] -> (generated [b, n_blocks*block], row-forwards)."""
    steps = steps or block
    b = prompts.shape[0]
    n_blocks = math.ceil(max_new / block)
    state, _ = ctx.prefill(prompts, capacity=prompts.shape[1] + n_blocks * block)
    out, row_forwards = [], 0
    for _ in range(n_blocks):
        xt = torch.full((b, block), mask_id, dtype=torch.long)
        for step in range(steps):
            masked = xt == mask_id
            if not masked.any():
                break
            row_forwards += int(masked.any(-1).sum())
            logits = den.denoise(xt, masked.float().mean(-1), state)
            pred, conf = x0_predict(logits, mask_id, torch.zeros(b))  # greedy
            commit = select_commits(masked, conf, torch.full((b,), step), torch.full((b,), steps),
                                    torch.full((b,), gamma))  # fmt: skip
            xt = torch.where(commit, pred, xt)
        out.append(xt)
        ctx.extend(xt, state)
    return torch.cat(out, 1)[:, :max_new], row_forwards


@torch.no_grad()
def mock_ar_generate(ctx: ContextTower, den: DenoiserTower, prompts: Tensor, max_new: int) -> Tensor:
    """Greedy mock-AR (model-spec.md §2.5) of prompts [b, P], P >= 2 -> generated [b, max_new]: the
    unmodulated denoiser reads the last committed token over the context of every token before it, and the
    context tower then consumes that token."""
    state, _ = ctx.prefill(prompts[:, :-1], capacity=prompts.shape[1] + max_new)
    last, out = prompts[:, -1], []
    for _ in range(max_new):
        nxt = den.mock_ar_step(last, state).argmax(-1)
        ctx.extend(last[:, None], state)
        out.append(nxt)
        last = nxt
    return torch.stack(out, 1)


@torch.no_grad()
def decoding_report(
    ctx: ContextTower, den: DenoiserTower, prompts: Tensor, max_new: int = 64, block: int = 16,
    gammas: tuple[float, ...] = (0.9, 0.8, 0.5),
) -> dict:  # fmt: skip
    ctx.eval()
    den.eval()
    ar = greedy_continuations(ctx, prompts, max_new)[:, prompts.shape[1] :]

    def agreement(gen: Tensor) -> dict[str, float]:
        eq = gen == ar
        first = torch.where(eq.all(-1), torch.full((eq.shape[0],), max_new), (~eq).float().argmax(-1))
        return {"ar_token_match": float(eq.float().mean()), "ar_first_divergence_mean": float(first.float().mean())}

    rows = {}
    for g in gammas:
        gen, fw = diffusion_generate(ctx, den, prompts, max_new, block, g)
        rows[g] = {"tokens_per_denoiser_forward": gen.numel() / max(fw, 1), **agreement(gen)}
    mock = agreement(mock_ar_generate(ctx, den, prompts, max_new))
    return {"prompts": prompts.shape[0], "prompt_len": prompts.shape[1], "max_new": max_new, "block": block,
            "by_gamma": rows, "mock_ar": mock}  # fmt: skip
