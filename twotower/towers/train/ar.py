"""Autoregressive pre-training of the context tower: next-token cross-entropy over random corpus windows.

The forward is the tower's own inference path, `ContextTower.forward` on a fresh `ContextState` (causal
attention, Mamba scans from a zero state), so training and serving share every line of layer code.
AdamW, warmup-stable-decay LR, gradient clipping, aux-loss-free MoE balancing, fixed seeds; a resumable
checkpoint (model, optimiser, step, schedule length, RNG states, elapsed time) in `run_dir`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..context import ContextTower
from .common import (
    Budget,
    OptimConfig,
    RouterBalancer,
    load_checkpoint,
    make_optimizer,
    progress,
    rng_state,
    save_checkpoint,
    set_lr,
    set_rng_state,
    wsd_lr,
)
from .corpus import random_windows, sequential_windows


def ar_loss(ctx: ContextTower, ids: Tensor, reduction: str = "mean") -> Tensor:
    """Mean next-token CE of ids [b, l] (positions 0..l-2 predict 1..l-1)."""
    state = ctx.new_state(ids.shape[0], ids.shape[1])
    hidden = ctx(ids, state)
    logits = ctx.logits(hidden[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction=reduction)


@torch.no_grad()
def eval_ar(ctx: ContextTower, stream: Tensor, seq_len: int, batch: int, max_windows: int) -> float:
    was = ctx.training
    ctx.eval()
    tot, n = 0.0, 0
    for ids in sequential_windows(stream, batch, seq_len, max_windows):
        tot += float(ar_loss(ctx, ids, reduction="sum"))
        n += ids.shape[0] * (ids.shape[1] - 1)
    ctx.train(was)
    return tot / max(n, 1)


@dataclass
class ARConfig:
    seq_len: int = 256
    batch: int = 8
    steps: int | None = None  # fixed step count; None = from the wall-clock budget
    minutes: float = 55.0
    eval_every: int = 200
    eval_windows: int = 96
    ckpt_every_s: float = 300.0
    seed: int = 0
    optim: OptimConfig = field(default_factory=OptimConfig)


def train_ar(ctx: ContextTower, train: Tensor, heldout: Tensor, run_dir: Path, cfg: ARConfig, log=print) -> dict:
    """Train `ctx` in place; resumes from run_dir/ar.pt when present. Returns a summary dict."""
    run_dir = Path(run_dir)
    ckpt_path = run_dir / "ar.pt"
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = make_optimizer(list(ctx.named_parameters()), cfg.optim)
    balancer = RouterBalancer(ctx)
    step, total, elapsed, history = 0, cfg.steps, 0.0, []
    ck = load_checkpoint(ckpt_path)
    if ck is not None:
        ctx.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optim"])
        set_rng_state(ck["rng"], gen)
        step, total, elapsed, history = ck["step"], ck["total"], ck["elapsed"], ck["history"]
        log(f"[ar] resumed at step {step}/{total} ({elapsed / 60:.1f} min done)")
    budget = Budget(cfg.minutes)
    ctx.train()
    t_start = time.perf_counter() - elapsed
    last_ckpt = time.perf_counter()
    calib_t: list[float] = []
    marks: list[tuple[int, float]] = []  # (step, wall clock) for re-planning the schedule
    tokens_per_step = cfg.batch * cfg.seq_len
    bar = progress(total, "ar", step)

    def checkpoint() -> None:
        save_checkpoint(ckpt_path, model=ctx.state_dict(), optim=opt.state_dict(), rng=rng_state(gen),
                        step=step, total=total, elapsed=time.perf_counter() - t_start, history=history)  # fmt: skip

    loss_ema = None
    while total is None or step < total:
        t0 = time.perf_counter()
        lr = wsd_lr(step, total or 10**9, cfg.optim)
        set_lr(opt, lr)
        ids = random_windows(train, cfg.batch, cfg.seq_len, gen)
        loss = ar_loss(ctx, ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = float(torch.nn.utils.clip_grad_norm_(ctx.parameters(), cfg.optim.grad_clip))
        opt.step()
        load = balancer.max_load()
        balancer.step()
        step += 1
        lv = float(loss.detach())
        if not math.isfinite(lv):
            raise FloatingPointError(f"[ar] loss is {lv} at step {step}")
        loss_ema = lv if loss_ema is None else 0.98 * loss_ema + 0.02 * lv
        dt = time.perf_counter() - t0
        if total is None:  # calibrate the schedule length on the wall-clock budget
            calib_t.append(dt)
            if len(calib_t) >= budget.calib_steps:
                sps = sorted(calib_t[2:])[len(calib_t[2:]) // 2]
                total = budget.steps_for(sps, step, time.perf_counter() - t_start)
                bar.total = total
                log(f"[ar] {sps:.2f} s/step ({tokens_per_step / sps:.0f} tok/s): schedule of {total} steps "
                    f"({total * tokens_per_step / 1e6:.1f}M tokens)")  # fmt: skip
        marks.append((step, time.perf_counter()))
        if total is not None and cfg.steps is None and step % 50 == 0 and len(marks) > 50:
            (s0, w0), (s1, w1) = marks[max(0, len(marks) - 201)], marks[-1]
            new = budget.replan(total, step, w1 - t_start, (w1 - w0) / (s1 - s0), cfg.optim.decay_fraction)
            if abs(new - total) > 0.02 * total:
                log(f"[ar] replanned: {total} -> {new} steps ({(w1 - w0) / (s1 - s0):.2f} s/step recently)")
                total = new
                bar.total = total
        bar.update(1)
        bar.set_postfix(loss=f"{loss_ema:.3f}", lr=f"{lr:.1e}", refresh=False)
        if step % cfg.eval_every == 0 or step == total:
            ev = eval_ar(ctx, heldout, cfg.seq_len, cfg.batch * 4, cfg.eval_windows)
            el = time.perf_counter() - t_start
            history.append({"step": step, "train_loss": loss_ema, "heldout_loss": ev, "minutes": el / 60})
            log(f"[ar] step {step}/{total} train {loss_ema:.4f} heldout {ev:.4f} (ppl {math.exp(ev):.1f}) "
                f"lr {lr:.2e} gnorm {gnorm:.2f} moe-maxload {load:.2f} {el / 60:.1f} min")  # fmt: skip
        if time.perf_counter() - last_ckpt > cfg.ckpt_every_s:
            checkpoint()
            last_ckpt = time.perf_counter()
    bar.close()
    balancer.remove()
    checkpoint()
    final = history[-1]["heldout_loss"] if history else eval_ar(ctx, heldout, cfg.seq_len, cfg.batch * 4,
                                                                   cfg.eval_windows)  # fmt: skip
    return {"steps": step, "tokens": step * tokens_per_step, "minutes": (time.perf_counter() - t_start) / 60,
            "heldout_loss": final, "history": history}  # fmt: skip
