"""`twotower eval`: the throughput / quality trade-off of a TwoTower checkpoint on held-out Python files.

Prompts: from held-out files of the training corpus (whole files never trained on), a prompt is the text
up to the end of a line, without its newline (at most `prompt_chars` characters); the target is the next
line. (Cutting after the newline would split the newline-plus-indent tokens the BPE learned.)
For AR, lossless, mock-AR and mask diffusion over a grid of gamma x block size (plus rows with fewer
steps per block than tokens, `few_steps`), every prompt is decoded greedily
through the in-process engine, and we report
  tokens per forward of each tower (and of both), tokens/s at batch 1 on a subset of prompts,
  quality (a) next-line exact match: the first generated line equals the held-out line,
          (b) mean log-likelihood per generated token under the context tower (teacher-forced),
          (c) agreement with AR greedy: fraction of positions where the token equals AR's,
  the memory-bound cost (cost_model.py, exact counts at batch 1 on the same subset): distinct experts
  touched per MoE layer per forward of each tower, bytes read per generated token, and from those the
  modelled memory-bound speed-up over AR,
  and "quality retained" = (a') next-line prefix match (the fraction of the held-out line reproduced
  before the first wrong character) relative to AR's; exact match is too sparse for a 5M-parameter
  model to carry a ratio (it is reported beside it, with (b) and (c)).
A PNG plots throughput multiple (tokens/s relative to AR at batch 1) against quality retained, and
against likelihood retained = exp(mean log p - AR's), which the prefix measure understates: the start of a
next line is mostly indentation, which even poor text gets right.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from dataclasses import dataclass, field

from twotower.cluster.engine.engine import Engine
from twotower.cluster.engine.params import SamplingParams

from .cost_model import Cost, CostMeter, speedup


@dataclass
class Prompt:
    text: str
    next_line: str


@dataclass
class Row:
    label: str
    mode: str
    block_size: int | None
    gamma: float | None
    steps: int | None = None  # T, steps per block (diffusion)
    tokens: int = 0
    den_forwards: int = 0
    ctx_forwards: int = 0
    tok_s: float = 0.0  # batch 1
    next_line_em: float = 0.0
    next_line_prefix: float = 0.0  # fraction of the held-out line's characters reproduced before the first error
    loglik: float = 0.0  # mean log p per generated token under the context tower
    ar_agree: float = 0.0
    cost: Cost | None = None  # memory-bound cost at batch 1 (None: not an in-process engine)
    extras: dict = field(default_factory=dict)

    @property
    def tpf_den(self) -> float:
        return self.tokens / self.den_forwards if self.den_forwards else float("nan")

    @property
    def tpf_ctx(self) -> float:
        return self.tokens / self.ctx_forwards if self.ctx_forwards else float("nan")

    @property
    def tpf_all(self) -> float:
        n = self.den_forwards + self.ctx_forwards
        return self.tokens / n if n else float("nan")


def heldout_prompts(n: int, prompt_chars: int = 400, seed: int = 0, min_line: int = 8) -> list[Prompt]:
    """n prompts from held-out stdlib files: text before a non-trivial line, and that line."""
    from twotower.towers.train.corpus import Corpus

    corpus = Corpus.load()
    _, held = corpus.split()
    rng = random.Random(seed)
    out: list[Prompt] = []
    files = [corpus.texts[i] for i in held]
    rng.shuffle(files)
    for text in files:
        lines = text.splitlines(keepends=True)
        cands = [j for j in range(5, len(lines)) if len(lines[j].strip()) >= min_line]
        if not cands:
            continue
        j = rng.choice(cands)
        before = "".join(lines[:j])[-prompt_chars:].removesuffix("\n")
        out.append(Prompt(before, lines[j].rstrip("\n")))
        if len(out) == n:
            break
    return out


def _next_line(generated: str) -> str | None:
    """The line after the prompt's last one: generated text must start by closing that line."""
    parts = generated.split("\n")
    return parts[1] if len(parts) > 1 and parts[0] == "" else None


def _prefix_frac(generated: str | None, target: str) -> float:
    if not generated or not target:
        return float(generated == target)
    n = 0
    for a, b in zip(generated, target, strict=False):
        if a != b:
            break
        n += 1
    return n / len(target)


def grid(block_sizes: list[int], gammas: list[float], max_tokens: int, few_steps: tuple[int, ...] = (),
         few_steps_gamma: float = 0.8) -> list[tuple[str, SamplingParams]]:  # fmt: skip
    """AR, lossless, mock-AR, then diffusion over gamma x block size with T = S steps per block; each T in
    `few_steps` adds rows with T < S at `few_steps_gamma` (the schedule floor ceil(n / (T - step)) then
    commits at least S / T tokens per step: the fixed-k end of the trade-off)."""
    base = dict(max_tokens=max_tokens, ignore_eos=False, temperature=0.0)
    out = [("AR", SamplingParams(mode="ar", **base)),
           ("lossless S=16", SamplingParams(mode="lossless", block_size=16, gamma=0.8, **base)),
           # drafts from one denoiser forward: shorter accepted prefixes, far fewer forwards
           *((f"lossless S={s} T=1", SamplingParams(mode="lossless", block_size=s, steps_per_block=1, **base))
             for s in (4, 8, 16)),
           ("mock-AR", SamplingParams(mode="mock_ar", **base))]  # fmt: skip
    for s in block_sizes:
        for g in gammas:
            out.append((f"diffusion S={s} g={g}", SamplingParams(mode="diffusion", block_size=s, gamma=g,
                                                                 steps_per_block=s, **base)))  # fmt: skip
    for t in few_steps:
        for s in block_sizes:
            if t < s:
                out.append((f"diffusion S={s} T={t} g={few_steps_gamma}",
                            SamplingParams(mode="diffusion", block_size=s, gamma=few_steps_gamma,
                                           steps_per_block=t, **base)))  # fmt: skip
    return out


def evaluate(engine: Engine, prompts: list[Prompt], configs: list[tuple[str, SamplingParams]],
             speed_prompts: int = 4, log=print) -> list[Row]:  # fmt: skip
    tok = engine.tokenizer
    texts = [p.text for p in prompts]
    rows: list[Row] = []
    ar_ids: list[list[int]] | None = None
    for label, sp in configs:
        t0 = time.perf_counter()
        reqs = engine.generate(texts, sp)  # batched: quality and forward counts
        row = Row(label, sp.mode, sp.block_size if sp.mode in ("diffusion", "lossless") else None,
                  sp.gamma if sp.mode == "diffusion" else None,
                  sp.steps_per_block if sp.mode == "diffusion" else None)  # fmt: skip
        row.tokens = sum(len(r.output_ids) for r in reqs)
        row.den_forwards = sum(r.usage.denoiser_forwards for r in reqs)
        row.ctx_forwards = sum(r.usage.context_forwards for r in reqs)
        outs = [tok.decode(r.output_ids) for r in reqs]
        lines = [_next_line(o) for o in outs]
        row.next_line_em = statistics.fmean(g == p.next_line for g, p in zip(lines, prompts, strict=True))
        row.next_line_prefix = statistics.fmean(
            _prefix_frac(g, p.next_line) for g, p in zip(lines, prompts, strict=True)
        )
        lls = []
        for p, r in zip(prompts, reqs, strict=True):
            if r.output_ids:
                _, lp, _ = engine.score(tok.encode(p.text), r.output_ids)
                lls.extend(lp)
        row.loglik = statistics.fmean(lls) if lls else float("nan")
        ids = [r.output_ids for r in reqs]
        if ar_ids is None:
            ar_ids = ids
        same = total = 0
        for a, b in zip(ids, ar_ids, strict=True):
            n = min(len(a), len(b))
            same += sum(x == y for x, y in zip(a[:n], b[:n], strict=True))
            total += n
        row.ar_agree = same / total if total else float("nan")
        # batch-1 wall-clock throughput on a subset
        t1 = time.perf_counter()
        n_tok = sum(len(engine.generate([t], sp)[0].output_ids) for t in texts[:speed_prompts])
        row.tok_s = n_tok / (time.perf_counter() - t1)
        row.cost = measure_cost(engine, texts[:speed_prompts], sp)
        rows.append(row)
        log(f"  {label}: {time.perf_counter() - t0:.1f} s")
    return rows


def measure_cost(engine: Engine, texts: list[str], sp: SamplingParams) -> Cost | None:
    """The summed memory-bound cost of generating each text alone (batch 1), untimed."""
    if not hasattr(engine.ex, "ctx"):  # counting hooks the in-process runners
        return None
    total = Cost()
    for text in texts:
        with CostMeter(engine.ex) as meter:
            out = engine.generate([text], sp)[0]
        total.add(meter.cost(len(out.output_ids)))
    return total


def modelled_speedup(r: Row, ar: Row) -> float:
    return speedup(r.cost, ar.cost) if r.cost and ar.cost else float("nan")


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def prefix_retained(r: Row, ar: Row) -> float:
    """Next-line prefix match relative to AR's."""
    return _ratio(r.next_line_prefix, ar.next_line_prefix)


def likelihood_retained(r: Row, ar: Row) -> float:
    """exp(mean log p - AR's mean log p): the geometric-mean probability per generated token under the
    context tower, relative to AR's own greedy text (1 for AR and lossless)."""
    return math.exp(r.loglik - ar.loglik)


def table(rows: list[Row]) -> str:
    ar = rows[0]
    lines = ["| config | TPF den | TPF ctx | TPF all | tok/s (b=1) | x AR | next-line EM | next-line prefix | "
             "retained | loglik/token | lik. retained | AR agree | experts/layer ctx | experts/layer den | "
             "KB read/token | modelled x AR |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    nan = float("nan")
    for r in rows:
        c = r.cost
        ex_ctx = c.towers["context"].experts_per_layer if c else nan
        ex_den = c.towers["denoiser"].experts_per_layer if c else nan
        kb = c.bytes_per_token / 1e3 if c else nan
        lines.append(f"| {r.label} | {r.tpf_den:.2f} | {r.tpf_ctx:.2f} | {r.tpf_all:.2f} | {r.tok_s:.1f} | "
                     f"{_ratio(r.tok_s, ar.tok_s):.2f} | {r.next_line_em:.3f} | "
                     f"{r.next_line_prefix:.3f} | {prefix_retained(r, ar):.3f} | {r.loglik:.3f} | "
                     f"{likelihood_retained(r, ar):.3f} | {r.ar_agree:.3f} | {ex_ctx:.2f} | {ex_den:.2f} | "
                     f"{kb:.0f} | {modelled_speedup(r, ar):.2f} |")  # fmt: skip
    return "\n".join(lines)


def _cpu_speed(r: Row, ar: Row) -> float:
    return _ratio(r.tok_s, ar.tok_s)


def _panel(ax, rows: list[Row], quality, ylabel: str, speed=_cpu_speed,
           xlabel: str = "throughput multiple (tokens/s relative to AR, batch 1)") -> None:  # fmt: skip
    """One trade-off panel: x = speed(row, ar), y = quality(row, ar)."""
    ar = rows[0]
    full = [r for r in rows if r.mode == "diffusion" and r.steps == r.block_size]
    for s in sorted({r.block_size for r in full}):
        pts = sorted(((speed(r, ar), quality(r, ar), r.gamma) for r in full if r.block_size == s),
                     key=lambda p: p[2])  # fmt: skip
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"diffusion S={s} (labels: gamma)")
        for x, y, g in pts:
            ax.annotate(f"{g}", (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
    few = [r for r in rows if r.mode == "diffusion" and r.steps != r.block_size]
    for t in sorted({r.steps for r in few}):
        pts = sorted((speed(r, ar), quality(r, ar), r.block_size) for r in few if r.steps == t)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "x--", label=f"diffusion T={t} (labels: S)")
        for x, y, s in pts:
            ax.annotate(f"S{s}", (x, y), fontsize=7, textcoords="offset points", xytext=(3, -9))
    for r in rows:
        if r.mode in ("ar", "lossless", "mock_ar"):
            ax.plot(speed(r, ar), quality(r, ar), "s", label=r.label)
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.axvline(1.0, color="grey", lw=0.5)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)


def plot(rows: list[Row], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right, model) = plt.subplots(1, 3, figsize=(19, 5.5))
    _panel(left, rows, prefix_retained, "quality retained (next-line prefix match relative to AR)")
    _panel(right, rows, likelihood_retained, "likelihood retained (exp(mean log p - AR's), context tower)")
    _panel(model, rows, likelihood_retained, "likelihood retained", speed=modelled_speedup,
           xlabel="modelled memory-bound speed-up over AR (bytes read per token, batch 1)")
    left.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
