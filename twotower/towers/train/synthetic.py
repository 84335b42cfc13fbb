"""Synthetic exact-answer tasks and a micro two-tower trained on them in about a minute (the CI tier).

Task strings (characters, one token each):
    c:<digits>=<digits></s><pad>...      copy
    r:<digits>=<reversed digits></s>...  reverse
Every example is one sequence: the prompt `c:12345=` (P = n + 3 tokens for n digits), then the answer, EOS
and pads up to `blocks * block` tokens, so the denoiser's blocks start right after the prompt, as they do
in the engine. Rows of one batch share the digit count n (one block layout per batch).

Held-out digit strings (crc32 % 8 == 0) never appear in training.
"""

from __future__ import annotations

import random
import time
import zlib
from collections.abc import Sequence

import torch
from torch import Tensor

from ..config import NemotronHConfig
from ..context import ContextTower
from ..denoiser import DenoiserTower
from .common import OptimConfig, RouterBalancer, init_for_training_, make_optimizer, set_lr, wsd_lr
from .denoiser import BlockLayout, denoiser_from_context, denoiser_loss

SPECIALS = ("<pad>", "<s>", "</s>", "<mask>")
CHARS = "0123456789cr:="
PAD, BOS, EOS, MASK = 0, 1, 2, 3


class CharTokenizer:
    """One id per character of CHARS (ids 4..), specials 0..3; implements the engine's TokenizerLike."""

    def __init__(self, vocab_size: int = 32) -> None:
        if vocab_size < len(SPECIALS) + len(CHARS):
            raise ValueError(f"vocab_size must be >= {len(SPECIALS) + len(CHARS)}")
        self._vocab_size = vocab_size
        self._id = {c: i + len(SPECIALS) for i, c in enumerate(CHARS)}

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = [self._id[c] for c in text]
        return [BOS, *ids] if add_bos else ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        out = []
        for i in ids:
            tok = self.id_to_token(int(i))
            if tok is None:
                raise ValueError(f"token id {i} outside [0, {self._vocab_size})")
            if i < len(SPECIALS) or i >= len(SPECIALS) + len(CHARS):
                if not skip_special_tokens:
                    out.append(tok)
                continue
            out.append(tok)
        return "".join(out)

    def id_to_token(self, i: int) -> str | None:
        if not 0 <= i < self._vocab_size:
            return None
        if i < len(SPECIALS):
            return SPECIALS[i]
        j = i - len(SPECIALS)
        return CHARS[j] if j < len(CHARS) else f"<extra_{i}>"

    def token_to_id(self, token: str) -> int | None:
        if token in SPECIALS:
            return SPECIALS.index(token)
        return self._id.get(token)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def bos_token_id(self) -> int:
        return BOS

    @property
    def eos_token_id(self) -> int:
        return EOS

    @property
    def pad_token_id(self) -> int:
        return PAD


def is_heldout(digits: str) -> bool:
    return zlib.crc32(digits.encode()) % 8 == 0


def answer(op: str, digits: str) -> str:
    return digits if op == "c" else digits[::-1]


def sample_digits(rng: random.Random, n: int, heldout: bool) -> str:
    while True:
        d = "".join(rng.choice("0123456789") for _ in range(n))
        if is_heldout(d) == heldout:
            return d


def make_batch(tok: CharTokenizer, rng: random.Random, batch: int, n: int, block: int, blocks: int) -> Tensor:
    """[batch, (n + 3) + blocks * block] token ids of random copy/reverse examples with n digits."""
    rows = []
    for _ in range(batch):
        op = rng.choice("cr")
        d = sample_digits(rng, n, heldout=False)
        ids = tok.encode(f"{op}:{d}=") + tok.encode(answer(op, d)) + [EOS]
        ids += [PAD] * (n + 3 + blocks * block - len(ids))
        rows.append(ids)
    return torch.tensor(rows, dtype=torch.long)


def answer_loss(ctx: ContextTower, ids: Tensor, prompt_len: int) -> Tensor:
    """Next-token CE on the answer, EOS and pads only (the random prompt digits are unpredictable)."""
    hidden = ctx(ids, ctx.new_state(ids.shape[0], ids.shape[1]))
    logits = ctx.logits(hidden[:, prompt_len - 1 : -1])
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, prompt_len:].reshape(-1))


def micro_config(vocab_size: int = 32) -> NemotronHConfig:
    """~0.2M parameters per tower; every layer kind."""
    return NemotronHConfig(
        vocab_size=vocab_size, hidden_size=64, pattern="M*EM*E",
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        mamba_num_heads=4, mamba_head_dim=16, n_groups=1, ssm_state_size=16, conv_kernel=4, chunk_size=16,
        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
        moe_shared_expert_intermediate_size=64, routed_scaling_factor=1.0, intermediate_size=128,
        max_position_embeddings=1024, torch_dtype="float32",
    )  # fmt: skip


def _fit(model: torch.nn.Module, steps: int, batch_loss, log, tag: str) -> float:
    """The micro recipe's optimisation loop: AdamW on a short WSD schedule with aux-free MoE balancing;
    batch_loss(step) -> scalar loss. Returns the last loss."""
    oc = OptimConfig(lr=3e-3, warmup_steps=20, weight_decay=0.0, decay_fraction=0.3)
    opt = make_optimizer(list(model.named_parameters()), oc)
    bal = RouterBalancer(model, rate=1e-2)
    model.train()
    for step in range(steps):
        set_lr(opt, wsd_lr(step, steps, oc))
        loss = batch_loss(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), oc.grad_clip)
        opt.step()
        bal.step()
        if log and (step + 1) % 100 == 0:
            log(f"{tag} {step + 1} loss {float(loss.detach()):.4f}")
    bal.remove()
    model.eval()
    return float(loss.detach())


def train_micro(
    seed: int = 0,
    ar_steps: int = 400,
    den_steps: int = 400,
    batch: int = 32,
    block: int = 8,
    blocks: int = 2,
    min_digits: int = 2,
    max_digits: int = 7,
    log=None,
) -> tuple[ContextTower, DenoiserTower, dict]:
    """Train the micro context tower (AR), then the denoiser against it (frozen). Returns (ctx, den, stats)."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tok = CharTokenizer()
    ctx = init_for_training_(ContextTower(micro_config(tok.vocab_size)), seed=seed)
    stats: dict = {}

    def ar_batch(step: int) -> Tensor:
        n = rng.randint(min_digits, max_digits)
        return answer_loss(ctx, make_batch(tok, rng, batch, n, block, blocks), n + 3)

    t0 = time.perf_counter()
    stats["ar_loss"] = _fit(ctx, ar_steps, ar_batch, log, "ar")
    stats["ar_s"] = time.perf_counter() - t0

    for p in ctx.parameters():
        p.requires_grad_(False)
    den = denoiser_from_context(ctx, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)

    def den_batch(step: int) -> Tensor:
        n = rng.randint(min_digits, max_digits)
        window = make_batch(tok, rng, batch, n, block, blocks)
        return denoiser_loss(den, ctx, window, BlockLayout(n + 3, block, blocks), gen).total

    t0 = time.perf_counter()
    stats["den_loss"] = _fit(den, den_steps, den_batch, log, "den")
    stats["den_s"] = time.perf_counter() - t0
    return ctx, den, stats
