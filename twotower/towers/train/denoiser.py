"""Training the denoiser tower against the frozen context tower, every block of a sequence in one pass.

Layout of one training window ids [b, P + n*S]: a context-only prefix of P >= 1 tokens, then n blocks of S.
Block j covers positions s_j .. s_j + S - 1 with s_j = P + j*S; at inference it would be denoised after the
context tower has read ids[:, :s_j] (prompt + committed blocks), so here it is conditioned on exactly that:

1. `context_features`: the frozen context tower reads the CLEAN window once, no grad, exactly as the
   engine feeds it (`ContextTower.forward`: the prefix, then one block extension at a time), and keeps, per
   attention layer, its K/V at every position, and per Mamba layer the conv history (last raw xBC columns)
   and SSM state after s_j tokens for every block j (snapshots between the extensions).
2. `denoiser_forward`: the denoiser reads the noisy blocks xt [b, n*S] in one pass:
   - adaLN per block: t_j (the block's masked fraction) -> (shift, scale, gate) broadcast over its S positions;
   - attention layer i: block j's queries see the context tower's layer-i keys at positions < s_j and the
     denoiser's own keys of block j (one boolean mask over [context keys || block keys]);
   - Mamba layer i: the layer's own mixer on [b*n, S] rows, row (r, j) seeded with block j's boundary state;
   - MoE / MLP: per token.
   This equals `DenoiserTower.denoise` run block by block on `ContextTower.prefill` states
   (tests/towers/test_train_denoiser.py), so what is trained is what is served.

Corruption and loss (TwoTower's choice, decoding.md §4.1): per block t ~ U[t_min, 1], each token masked with
probability t (at least one per block); the time input is the block's realised masked fraction (what the
engine passes at inference). Loss = mean NLL over all masked positions of the batch, WITHOUT the MDLM 1/t
weight (TwoTower drops it for stability; with a masked-count mean it would over-weight nearly clean blocks).
The mask id's logit is excluded from the softmax, as in the engine's x0 prediction.
Complementary masking (Fast-dLLM v2): each window is used twice, with the mask and its complement, so every
token of every block gets a gradient; the frozen tower's features are computed once for both.
Distillation (decoding.md §4.3): a fraction of the batches are [corpus prefix | the context tower's own
greedy continuation]; the denoiser then learns the AR tower's mode, which raises its confidence and so
tokens per denoiser forward at a given gamma. Real-text batches keep it sane on arbitrary prompts.

Mock-AR term: the same checkpoint also serves mock-AR, where the denoiser runs WITHOUT time conditioning
on one clean token at position p (context = tokens < p) and its output is read as the distribution of
token p + 1 (`DenoiserTower.mock_ar_step`). Diffusion training alone lets the shared backbone drift away
from that reading (the unmodulated tower then babbles). So at every block start s_j the unmodulated
denoiser reads x[s_j] over exactly block j's context features, and its next-token distribution is pulled
to the frozen context tower's (KL(context || denoiser)); it costs one token per block and no extra
context pass (`mock_ar_forward`, tested equal to `mock_ar_step`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from twotower import kernels
from twotower.decoding import MASK_TOKEN_ID

from ..config import ATTENTION, MAMBA
from ..context import ContextTower
from ..denoiser import DenoiserTower
from ..state import MambaState
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
from .corpus import random_windows

MASK_ID = MASK_TOKEN_ID


# ---- initialisation ------------------------------------------------------------------------------------
@torch.no_grad()
def denoiser_from_context(ctx: ContextTower, seed: int = 0, std: float = 0.02) -> DenoiserTower:
    """A denoiser whose backbone and head are copies of the context tower's, and whose adaLN is the
    identity at every t: t_block's last linear is zero, every scale_shift_tables[i] = (shift 0, scale 0,
    gate 1). At init each layer therefore computes exactly what the context tower's layer computes."""
    den = DenoiserTower(ctx.cfg).to(ctx.lm_head.weight.device, ctx.lm_head.weight.dtype)
    den.model.load_state_dict(ctx.model.state_dict())
    den.lm_head.weight.copy_(ctx.lm_head.weight)
    g = torch.Generator().manual_seed(seed)
    for lin in (den.t_embedder.mlp[0], den.t_embedder.mlp[2]):
        lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * std)
        lin.bias.zero_()
    den.t_block[1].weight.zero_()
    den.t_block[1].bias.zero_()
    for table in den.scale_shift_tables:
        table.zero_()
        table[2].fill_(1.0)
    return den


# ---- the frozen tower's features -------------------------------------------------------------------------
@dataclass
class BlockLayout:
    prefix: int  # P: context-only tokens before the first block (>= 1)
    block: int  # S
    nblocks: int  # n

    @property
    def length(self) -> int:
        return self.prefix + self.block * self.nblocks

    def starts(self) -> list[int]:
        return [self.prefix + j * self.block for j in range(self.nblocks)]


@dataclass
class ContextFeatures:
    kv: dict[int, tuple[Tensor, Tensor]]  # attention layer -> (k, v) [b, L, hkv, d] at every position
    mamba: dict[int, MambaState]  # Mamba layer -> state at every block start, rows (r, j) -> [b*n, ...]
    # log-probs [b, n, vocab] float32 of the context tower at each block start s_j (its distribution of
    # token s_j + 1 after reading tokens <= s_j): the mock-AR term's target; None unless asked for
    teacher: Tensor | None = None

    def repeat(self, times: int) -> ContextFeatures:
        """Rows repeated `times` over the batch (complementary masking reuses one context pass)."""
        kv = {i: (k.repeat(times, 1, 1, 1), v.repeat(times, 1, 1, 1)) for i, (k, v) in self.kv.items()}
        mamba = {i: MambaState(s.conv.repeat(times, 1, 1), s.ssm.repeat(times, 1, 1, 1)) for i, s in self.mamba.items()}
        teacher = None if self.teacher is None else self.teacher.repeat(times, 1, 1)
        return ContextFeatures(kv, mamba, teacher)


@torch.no_grad()
def context_features(ctx: ContextTower, ids: Tensor, layout: BlockLayout, teacher: bool = False) -> ContextFeatures:
    """The frozen context tower over the clean window ids [b, L], read the way the engine reads it: the
    prefix, then one block extension at a time (its inference path; the Mamba states at each block start
    are snapshots between extensions). Cheaper than tracing every intermediate state of one long scan.
    With `teacher`, also the context tower's next-token log-probs at every block start."""
    if ids.shape[1] != layout.length:
        raise ValueError(f"ids: expected length {layout.length}, got {ids.shape[1]}")
    b, n = ids.shape[0], layout.nblocks
    state = ctx.new_state(b, ids.shape[1])
    mamba_layers = [i for i, k in enumerate(ctx.cfg.pattern) if k == MAMBA]
    snaps: dict[int, list[MambaState]] = {i: [] for i in mamba_layers}
    first: list[Tensor] = []  # hidden state at each block start
    ctx(ids[:, : layout.prefix], state)
    for j, s in enumerate(layout.starts()):
        for i in mamba_layers:
            st = state.layers[i]
            snaps[i].append(MambaState(st.conv.clone(), st.ssm.clone()))
        if j + 1 < n:  # the last block's own tokens are never context
            first.append(ctx(ids[:, s : s + layout.block], state)[:, 0])
        elif teacher:  # ... but its first token's next-token distribution is a mock-AR target
            first.append(ctx(ids[:, s : s + 1], state)[:, 0])
    log_probs = torch.log_softmax(ctx.logits(torch.stack(first, 1)), -1) if teacher else None
    kv = {}
    for i, kind in enumerate(ctx.cfg.pattern):
        if kind == ATTENTION:
            k, v = state.layers[i].k, state.layers[i].v
            kv[i] = (k[:, : layout.length - layout.block], v[:, : layout.length - layout.block])
    mamba = {}
    for i in mamba_layers:  # rows (r, j) -> r * n + j
        conv = torch.stack([m.conv for m in snaps[i]], 1)
        ssm = torch.stack([m.ssm for m in snaps[i]], 1)
        mamba[i] = MambaState(conv.reshape(b * n, *conv.shape[2:]), ssm.reshape(b * n, *ssm.shape[2:]))
    return ContextFeatures(kv, mamba, log_probs)


def block_attention_mask(layout: BlockLayout, device=None, per_block: int | None = None) -> Tensor:
    """[n*m, Lc + n*m] bool over [context keys || block keys], Lc = L - S (no block sees the context
    tower's keys of the last block): block j's queries see context keys < s_j and the keys of block j.
    m = per_block tokens of each block are read (S for diffusion; 1 for mock-AR, the block's first token)."""
    S, n, L = layout.block, layout.nblocks, layout.length - layout.block
    m = S if per_block is None else per_block
    blk = torch.arange(n * m, device=device) // m  # block of each query
    starts = layout.prefix + blk * S
    ctx_ok = torch.arange(L, device=device)[None, :] < starts[:, None]
    own = blk[:, None] == blk[None, :]
    return torch.cat([ctx_ok, own], dim=1)


# ---- the one-pass denoiser forward ------------------------------------------------------------------------
def denoiser_forward(
    den: DenoiserTower, xt: Tensor, t: Tensor | None, feats: ContextFeatures, layout: BlockLayout
) -> Tensor:
    """xt [b, n*S] noisy blocks, t [b, n] masked fraction of each block -> x0 logits [b, n*S, vocab] float32.

    Same maths as `DenoiserTower.denoise` on each block, in one pass (see the module docstring).
    t = None runs the tower unmodulated (mock-AR; see `mock_ar_forward`), xt may then hold m < S tokens
    per block: [b, n*m], the first m tokens of each block."""
    b, N = xt.shape
    S, n = layout.block, layout.nblocks
    m = N // n
    if N != n * m or (t is None and m > S) or (t is not None and (m != S or t.shape != (b, n))):
        got = "None" if t is None else tuple(t.shape)
        raise ValueError(f"xt {tuple(xt.shape)} / t {got} do not match {n} blocks of {S}")
    d = den.cfg.hidden_size
    temb = None if t is None else den.time_embedding(t.reshape(-1)).view(b, n, 3, d)
    mask = block_attention_mask(layout, xt.device, per_block=m)
    h = den.model.embeddings(xt)
    for i, block in enumerate(den.model.layers):
        kind = block.kind
        if temb is None:  # unmodulated: the plain NemotronH layer
            u = block.norm(h)
            gate = 1.0
        else:
            sst = (den.scale_shift_tables[i][None, None] + temb)[:, :, None]  # [b, n, 1, 3, d]
            sst = sst.expand(b, n, S, 3, d).reshape(b, N, 3, d)
            shift, scale, gate = sst[:, :, 0], sst[:, :, 1], sst[:, :, 2]
            if kind in (MAMBA, ATTENTION):
                u = block.norm(h * (1 + scale) + shift)
            else:
                u = block.norm(h) * (1 + scale) + shift
        if kind == MAMBA:
            y, _ = block.mixer(u.reshape(b * n, m, d), feats.mamba[i])
            y = y.reshape(b, N, d)
        elif kind == ATTENTION:
            att = block.mixer
            q = att.q_proj(u).view(b, N, att.hq, att.hd)
            k = att.k_proj(u).view(b, N, att.hkv, att.hd)
            v = att.v_proj(u).view(b, N, att.hkv, att.hd)
            ck, cv = feats.kv[i]
            keys = torch.cat([ck.to(k.dtype), k], dim=1)
            vals = torch.cat([cv.to(v.dtype), v], dim=1)
            out = kernels.attention(q, keys, vals, mask[None].expand(b, -1, -1))
            y = att.o_proj(out.reshape(b, N, att.hq * att.hd))
        else:
            y = block.mixer(u)
        h = h + gate * y
    return den.lm_head(den.model.norm_f(h)).float()


def mock_ar_forward(den: DenoiserTower, window: Tensor, feats: ContextFeatures, layout: BlockLayout) -> Tensor:
    """Mock-AR at every block start of the clean window [b, L]: the unmodulated denoiser reads token s_j
    over block j's context (tokens < s_j) -> next-token logits [b, n, vocab] float32, i.e. what
    `DenoiserTower.mock_ar_step` returns for that token."""
    first = window[:, layout.prefix :: layout.block][:, : layout.nblocks]  # [b, n] tokens at s_j
    return denoiser_forward(den, first, None, feats, layout)


def kl_div(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(p || q) over the last dim, from log-probabilities [..., vocab] -> [...]."""
    return (logp.exp() * (logp - logq)).sum(-1)


def mock_ar_kl(den: DenoiserTower, window: Tensor, feats: ContextFeatures, layout: BlockLayout) -> Tensor:
    """Mean KL(context tower || unmodulated denoiser) of the next-token distributions at the block starts."""
    if feats.teacher is None:
        raise ValueError("feats: the mock-AR term needs context_features(..., teacher=True)")
    return kl_div(feats.teacher, torch.log_softmax(mock_ar_forward(den, window, feats, layout), -1)).mean()


# ---- corruption and loss ------------------------------------------------------------------------------
def corrupt(
    x: Tensor, S: int, gen: torch.Generator, t_min: float = 0.02, t_power: float = 1.0
) -> tuple[Tensor, Tensor]:
    """x [b, n*S] clean blocks -> (masked [b, n*S] bool, t [b, n]): per block t = t_min + (1 - t_min) u^(1/p),
    u ~ U[0, 1] (p = t_power; 1 is uniform, p > 1 leans to t near 1, the fully masked blocks that one-forward
    drafts and first denoising steps see), each token masked with probability t, at least one per block."""
    b, N = x.shape
    n = N // S
    u = torch.rand(b, n, 1, generator=gen)
    t = (u if t_power == 1.0 else u.pow(1.0 / t_power)) * (1 - t_min) + t_min
    masked = torch.rand(b, n, S, generator=gen) < t
    force = torch.randint(0, S, (b, n), generator=gen)
    none = ~masked.any(-1)
    masked[none, force[none]] = True
    return masked.view(b, N), masked.float().mean(-1)


def masked_nll(logits: Tensor, x: Tensor, masked: Tensor, mask_id: int = MASK_ID) -> tuple[Tensor, int]:
    """Summed NLL of the clean tokens at masked positions (mask id excluded from the softmax), count."""
    lg = logits[masked]
    lg = lg.index_fill(-1, torch.tensor([mask_id], device=lg.device), float("-inf"))
    return F.cross_entropy(lg, x[masked], reduction="sum"), int(masked.sum())


@dataclass
class DenoiserLoss:
    total: Tensor  # diffusion + mock_ar_weight * mock_ar, what is minimised
    diffusion: Tensor  # mean masked NLL
    mock_ar: Tensor | None  # mean KL at block starts, None when its weight is 0
    count: int  # masked tokens


def denoiser_loss(
    den: DenoiserTower,
    ctx: ContextTower,
    window: Tensor,
    layout: BlockLayout,
    gen: torch.Generator,
    complementary: bool = True,
    t_min: float = 0.02,
    mock_ar_weight: float = 0.0,
    t_power: float = 1.0,
) -> DenoiserLoss:
    """Mean masked NLL over a batch of clean windows [b, P + n*S] (loss only on the n blocks), plus the
    weighted mock-AR term."""
    feats = context_features(ctx, window, layout, teacher=mock_ar_weight > 0)
    mock = mock_ar_kl(den, window, feats, layout) if mock_ar_weight > 0 else None
    x = window[:, layout.prefix :]
    masked, _ = corrupt(x, layout.block, gen, t_min, t_power)
    if complementary:
        masked = torch.cat([masked, ~masked])
        x = torch.cat([x, x])
        feats = feats.repeat(2)
    b, N = x.shape
    t = masked.view(b, layout.nblocks, layout.block).float().mean(-1)
    xt = torch.where(masked, torch.full_like(x, MASK_ID), x)
    logits = denoiser_forward(den, xt, t, feats, layout)
    nll, count = masked_nll(logits, x, masked)
    diffusion = nll / max(count, 1)
    total = diffusion if mock is None else diffusion + mock_ar_weight * mock
    return DenoiserLoss(total, diffusion, mock, count)


# ---- distillation data ----------------------------------------------------------------------------------
@torch.no_grad()
def greedy_continuations(ctx: ContextTower, prefixes: Tensor, n_new: int) -> Tensor:
    """Greedy AR continuation of each prefix [b, P] by `n_new` tokens with the cached decode loop -> [b, P + n]."""
    state, logits = ctx.prefill(prefixes, capacity=prefixes.shape[1] + n_new)
    out = [prefixes]
    for k in range(n_new):
        nxt = logits.argmax(-1)
        out.append(nxt[:, None])
        if k + 1 < n_new:
            logits = ctx.decode(nxt, state)
    return torch.cat(out, dim=1)


def make_distill_set(
    ctx: ContextTower, stream: Tensor, count: int, prefix: int, n_new: int, gen: torch.Generator, batch: int = 128
) -> Tensor:
    chunks = []
    was = ctx.training
    ctx.eval()
    bar = progress(count, "distill-gen")
    while sum(c.shape[0] for c in chunks) < count:
        b = min(batch, count - sum(c.shape[0] for c in chunks))
        chunks.append(greedy_continuations(ctx, random_windows(stream, b, prefix, gen), n_new))
        bar.update(b)
    bar.close()
    ctx.train(was)
    return torch.cat(chunks)


# ---- training loop --------------------------------------------------------------------------------------
@dataclass
class DenoiserConfig:
    block: int = 16
    nblocks: int = 16  # real-text windows: P + 16 blocks of 16
    batch: int = 4  # windows per step (x2 rows with complementary masking)
    complementary: bool = True
    t_min: float = 0.02
    t_power: float = 1.0  # training draws t = t_min + (1 - t_min) u^(1/t_power); held-out eval stays uniform
    distill_fraction: float = 0.7  # share of steps on [prefix | AR greedy continuation] windows
    distill_count: int = 8192
    distill_prefix: int = 48
    distill_blocks: int = 8
    mock_ar_weight: float = 1.0  # weight of the mock-AR KL term (0 = diffusion only)
    steps: int | None = None
    minutes: float = 45.0
    eval_every: int = 200
    eval_windows: int = 48
    ckpt_every_s: float = 300.0
    seed: int = 0
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=50))


def _real_layout(cfg: DenoiserConfig, gen: torch.Generator) -> BlockLayout:
    """Real-text windows: a random context prefix of 1..S tokens, so block boundaries fall anywhere and the
    first block sometimes has almost no context (short prompts)."""
    p = int(torch.randint(1, cfg.block + 1, (1,), generator=gen))
    return BlockLayout(p, cfg.block, cfg.nblocks)


@torch.no_grad()
def eval_denoiser(den: DenoiserTower, ctx: ContextTower, stream: Tensor, cfg: DenoiserConfig) -> float:
    """Held-out mean masked NLL (the training objective, without complementary rows) at a fixed noise seed."""
    was = den.training
    den.eval()
    gen = torch.Generator().manual_seed(1234)
    tot, cnt = 0.0, 0
    layout = BlockLayout(cfg.block, cfg.block, cfg.nblocks)
    n = stream.numel() // layout.length
    wins = stream[: n * layout.length].view(n, layout.length)[: cfg.eval_windows]
    for i in range(0, wins.shape[0], 8):
        w = wins[i : i + 8]
        feats = context_features(ctx, w, layout)
        x = w[:, layout.prefix :]
        masked, t = corrupt(x, layout.block, gen, cfg.t_min)
        xt = torch.where(masked, torch.full_like(x, MASK_ID), x)
        nll, c = masked_nll(denoiser_forward(den, xt, t, feats, layout), x, masked)
        tot, cnt = tot + float(nll), cnt + c
    den.train(was)
    return tot / max(cnt, 1)


@torch.no_grad()
def eval_mock_ar(den: DenoiserTower, ctx: ContextTower, stream: Tensor, cfg: DenoiserConfig) -> dict[str, float]:
    """Held-out mock-AR at every block start of the eval windows: KL(context || denoiser) and the NLL of the
    true next token under each (the context tower's is the bar mock-AR is held to)."""
    was = den.training
    den.eval()
    layout = BlockLayout(cfg.block, cfg.block, cfg.nblocks)
    n = stream.numel() // layout.length
    wins = stream[: n * layout.length].view(n, layout.length)[: cfg.eval_windows]
    kl = nll_den = nll_ctx = 0.0
    cnt = 0
    for i in range(0, wins.shape[0], 8):
        w = wins[i : i + 8]
        feats = context_features(ctx, w, layout, teacher=True)
        logq = torch.log_softmax(mock_ar_forward(den, w, feats, layout), -1)
        nxt = w[:, layout.prefix + 1 :: layout.block][:, : layout.nblocks, None]  # token s_j + 1
        p = feats.teacher
        kl += float(kl_div(p, logq).sum())
        nll_den -= float(logq.gather(-1, nxt).sum())
        nll_ctx -= float(p.gather(-1, nxt).sum())
        cnt += nxt.numel()
    den.train(was)
    return {"kl": kl / cnt, "nll_denoiser": nll_den / cnt, "nll_context": nll_ctx / cnt}


def train_denoiser(
    den: DenoiserTower, ctx: ContextTower, train: Tensor, heldout: Tensor, run_dir: Path, cfg: DenoiserConfig,
    log=print,
) -> dict:  # fmt: skip
    """Train `den` in place against the frozen `ctx`; resumable from run_dir/denoiser.pt."""
    run_dir = Path(run_dir)
    ckpt_path = run_dir / "denoiser.pt"
    ctx.eval()
    for p in ctx.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    opt = make_optimizer(list(den.named_parameters()), cfg.optim)
    balancer = RouterBalancer(den)
    step, total, elapsed, history, tokens = 0, cfg.steps, 0.0, [], 0
    ck = load_checkpoint(ckpt_path)
    t_start = time.perf_counter()
    distill = None
    if ck is not None:
        den.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optim"])
        set_rng_state(ck["rng"], gen)
        step, total, elapsed, history = ck["step"], ck["total"], ck["elapsed"], ck["history"]
        distill = ck.get("distill")
        tokens = ck.get("tokens", 0)
        t_start -= elapsed
        log(f"[den] resumed at step {step}/{total} ({elapsed / 60:.1f} min done)")
    if distill is None and cfg.distill_fraction > 0:
        t0 = time.perf_counter()
        distill = make_distill_set(ctx, train, cfg.distill_count, cfg.distill_prefix,
                                   cfg.distill_blocks * cfg.block, gen)  # fmt: skip
        log(f"[den] distillation set: {distill.shape[0]} x ({cfg.distill_prefix} prefix + "
            f"{cfg.distill_blocks * cfg.block} greedy) tokens in {time.perf_counter() - t0:.0f} s")  # fmt: skip
    budget = Budget(cfg.minutes)
    den.train()
    last_ckpt = time.perf_counter()
    calib_t: list[float] = []
    marks: list[tuple[int, float]] = []  # (step, wall clock) for re-planning the schedule
    dlayout = BlockLayout(cfg.distill_prefix, cfg.block, cfg.distill_blocks)
    bar = progress(total, "denoiser", step)

    def checkpoint() -> None:
        save_checkpoint(ckpt_path, model=den.state_dict(), optim=opt.state_dict(), rng=rng_state(gen), step=step,
                        total=total, elapsed=time.perf_counter() - t_start, history=history, distill=distill,
                        tokens=tokens)  # fmt: skip

    ema = {"real": None, "distill": None, "mock_ar": None}
    while total is None or step < total:
        t0 = time.perf_counter()
        lr = wsd_lr(step, total or 10**9, cfg.optim)
        set_lr(opt, lr)
        use_distill = distill is not None and float(torch.rand(1, generator=gen)) < cfg.distill_fraction
        if use_distill:
            rows = torch.randint(0, distill.shape[0], (cfg.batch * cfg.nblocks // cfg.distill_blocks,), generator=gen)
            window, layout, kind = distill[rows], dlayout, "distill"
        else:
            layout = _real_layout(cfg, gen)
            window, kind = random_windows(train, cfg.batch, layout.length, gen), "real"
        parts = denoiser_loss(den, ctx, window, layout, gen, cfg.complementary, cfg.t_min, cfg.mock_ar_weight,
                             cfg.t_power)
        loss = parts.total
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = float(torch.nn.utils.clip_grad_norm_(den.parameters(), cfg.optim.grad_clip))
        opt.step()
        balancer.step()
        step += 1
        tokens += window.shape[0] * layout.nblocks * layout.block
        lv = float(loss.detach())
        if not math.isfinite(lv):
            raise FloatingPointError(f"[den] loss is {lv} at step {step}")
        for key, val in ((kind, float(parts.diffusion.detach())),
                         ("mock_ar", None if parts.mock_ar is None else float(parts.mock_ar.detach()))):  # fmt: skip
            if val is not None:
                ema[key] = val if ema[key] is None else 0.95 * ema[key] + 0.05 * val
        dt = time.perf_counter() - t0
        if total is None:
            calib_t.append(dt)
            if len(calib_t) >= budget.calib_steps:
                sps = sorted(calib_t[2:])[len(calib_t[2:]) // 2]
                total = budget.steps_for(sps, step, time.perf_counter() - t_start)
                bar.total = total
                log(f"[den] {sps:.2f} s/step: schedule of {total} steps")
        marks.append((step, time.perf_counter()))
        if total is not None and cfg.steps is None and step % 50 == 0 and len(marks) > 50:
            (s0, w0), (s1, w1) = marks[max(0, len(marks) - 201)], marks[-1]
            new = budget.replan(total, step, w1 - t_start, (w1 - w0) / (s1 - s0), cfg.optim.decay_fraction)
            if abs(new - total) > 0.02 * total:
                log(f"[den] replanned: {total} -> {new} steps ({(w1 - w0) / (s1 - s0):.2f} s/step recently)")
                total = new
                bar.total = total
        bar.update(1)
        bar.set_postfix(real=f"{ema['real'] or 0:.3f}", dist=f"{ema['distill'] or 0:.3f}",
                        mock=f"{ema['mock_ar'] or 0:.3f}", refresh=False)  # fmt: skip
        if step % cfg.eval_every == 0 or step == total:
            ev = eval_denoiser(den, ctx, heldout, cfg)
            mk = eval_mock_ar(den, ctx, heldout, cfg)
            el = time.perf_counter() - t_start
            history.append({"step": step, "train_real": ema["real"], "train_distill": ema["distill"],
                            "train_mock_ar_kl": ema["mock_ar"], "heldout_masked_nll": ev,
                            "heldout_mock_ar": mk, "minutes": el / 60})  # fmt: skip
            log(f"[den] step {step}/{total} train real {ema['real'] or 0:.4f} distill {ema['distill'] or 0:.4f} "
                f"mock-AR KL {ema['mock_ar'] or 0:.4f} | heldout masked-NLL {ev:.4f} mock-AR KL {mk['kl']:.4f} "
                f"NLL {mk['nll_denoiser']:.4f} (context {mk['nll_context']:.4f}) | lr {lr:.2e} gnorm {gnorm:.2f} "
                f"{el / 60:.1f} min")  # fmt: skip
        if time.perf_counter() - last_ckpt > cfg.ckpt_every_s:
            checkpoint()
            last_ckpt = time.perf_counter()
    bar.close()
    balancer.remove()
    checkpoint()
    final = history[-1]["heldout_masked_nll"] if history else eval_denoiser(den, ctx, heldout, cfg)
    mock = history[-1]["heldout_mock_ar"] if history else eval_mock_ar(den, ctx, heldout, cfg)
    return {"steps": step, "block_tokens": tokens, "minutes": (time.perf_counter() - t_start) / 60,
            "heldout_masked_nll": final, "heldout_mock_ar": mock, "history": history}  # fmt: skip
