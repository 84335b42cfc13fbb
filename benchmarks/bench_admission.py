"""Admission and finish cost against the number of running sequences.

    python benchmarks/bench_admission.py [--model DIR | --preset bench] [--running 1 8 32] [--prompt 16]

For each number of running rows N of one lane: the time to admit one more sequence (prefill of a
`--prompt`-token prompt into a free slot) and to finish one (free its slot), on the state pool; beside it
what the same join and leave cost with per-lane batch tensors (ContextState.cat of the lane's state and
the new row's, ContextState.select of the remaining rows: the copies the pool removed). Median of
`--repeat` runs, milliseconds. Performance figures live here, never in tests.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from twotower.cluster.engine.executor import InProcessExecutor, PoolLimits
from twotower.cluster.engine.loading import load_model
from twotower.towers.config import preset
from twotower.towers.context import ContextTower
from twotower.towers.denoiser import DenoiserTower
from twotower.towers.init import init_random_
from twotower.towers.state import ContextState


def towers(args):
    if args.model:
        m = load_model(args.model)
        return m.context, m.denoiser
    cfg = preset(args.preset)
    return init_random_(ContextTower(cfg).eval(), 0), init_random_(DenoiserTower(cfg).eval(), 1)


def median_ms(fn, repeat: int) -> float:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--running", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens of the admitted sequence")
    ap.add_argument("--context", type=int, default=256, help="tokens each running sequence has read")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ctx, den = towers(args)
    cfg = ctx.cfg
    slots = max(args.running) + 1
    print(f"model: {args.model or 'random ' + args.preset}; running rows read {args.context} tokens each; "
          f"admitted prompt {args.prompt} tokens; threads {args.threads}; median of {args.repeat}\n")  # fmt: skip
    print("| running rows | admit (pool) ms | finish (pool) ms | cat (batch tensors) ms | select (batch tensors) ms |")
    print("|---|---|---|---|---|")
    prompt = [5 + (i % 200) for i in range(args.prompt)]
    for n in args.running:
        ex = InProcessExecutor(ctx, den, PoolLimits(slots, args.context + 256, 16))
        ex.add_rows("lane", [[7] * args.context for _ in range(n)], None, True)
        ex.add_rows("lane", [prompt], None, True)  # warm-up
        ex.keep_rows("lane", list(range(n)))
        admits, finishes = [], []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            ex.add_rows("lane", [prompt], None, True)
            admits.append((time.perf_counter() - t0) * 1e3)
            rows = list(range(len(ex.lane_slots["lane"])))
            t0 = time.perf_counter()
            ex.keep_rows("lane", rows[:-1])  # the newest row finishes
            finishes.append((time.perf_counter() - t0) * 1e3)
        ex.keep_rows("lane", list(range(n)))
        admit, finish = statistics.median(admits), statistics.median(finishes)
        # the same join and leave with per-lane batch tensors
        lane_state = ctx.new_state(n, args.context + 64)
        lane_state.lengths[:] = args.context
        new_state = ctx.new_state(1, args.context + 64)
        new_state.lengths[:] = args.prompt
        cat = median_ms(lambda s=lane_state, t=new_state: ContextState.cat([s, t]), args.repeat)
        both = ContextState.cat([lane_state, new_state])
        sel = median_ms(lambda b=both, k=list(range(n)): b.select(k), args.repeat)
        print(f"| {n} | {admit:.2f} | {finish:.3f} | {cat:.2f} | {sel:.2f} |")
        del ex
    print(f"\n(config: {cfg.num_hidden_layers} layers, pattern {cfg.pattern}; the admit column includes the "
          f"{args.prompt}-token prefill, which does not depend on the running rows)")  # fmt: skip


if __name__ == "__main__":
    main()
