"""Tower pair benchmark on local Ray: state bytes and milliseconds per committed block, and how much
the two tower actors overlap with micro-batch pipelining vs without.

    python benchmarks/bench_pair.py [--model DIR | --preset tiny] [--requests 8] [--max-tokens 64]

Rows: `unpipelined` = one lane, each lane's work completes before the next starts; `pipelined xN` =
each group split over N micro-batch lanes, every lane's driving forward submitted before any result is
awaited. busy ctx / den = fraction of wall time each actor spent in tower work; overlap = fraction of
wall time both were busy at once (the pipelining gain). ms/transfer = time from the context actor
handing a delta to the transport until the denoiser actor received it.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch


def union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def length(spans) -> float:
    return sum(b - a for a, b in spans)


def intersect(x, y) -> float:
    total, i, j = 0.0, 0, 0
    while i < len(x) and j < len(y):
        a, b = max(x[i][0], y[j][0]), min(x[i][1], y[j][1])
        total += max(0.0, b - a)
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return total


def make_model(preset_name: str, out: str) -> str:
    from twotower.towers.checkpoint import save_twotower
    from twotower.towers.config import preset
    from twotower.towers.context import ContextTower
    from twotower.towers.denoiser import DenoiserTower
    from twotower.towers.init import init_random_

    cfg = preset(preset_name).replace(vocab_size=max(260, preset(preset_name).vocab_size))
    ctx, den = init_random_(ContextTower(cfg), 0), init_random_(DenoiserTower(cfg), 1)
    with torch.no_grad():
        den.lm_head.weight.mul_(30)  # confident enough to commit several tokens per step
    save_twotower(out, ctx, den, overwrite=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--gamma", type=float, default=0.5)
    ap.add_argument("--micro-batches", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--gpus", action="store_true", help="one GPU per tower, nccl transport")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from twotower.cluster.actors.config import PairConfig
    from twotower.cluster.actors.pair import TowerPair
    from twotower.cluster.actors.ray_executor import RayExecutor
    from twotower.cluster.engine.engine import Engine
    from twotower.cluster.engine.params import ModelLimits, SamplingParams
    from twotower.towers.config import NemotronHConfig

    model = args.model or make_model(args.preset, os.path.join(tempfile.mkdtemp(), "m"))
    cfg = NemotronHConfig.from_json_file(os.path.join(model, "config.json"))
    ray.init(include_dashboard=False, log_to_driver=False, num_cpus=None if args.gpus else 4)
    pair = TowerPair(model, PairConfig(use_gpus=args.gpus, replica_cpus=0.1, worker_threads=args.threads))
    limits = ModelLimits(cfg.vocab_size, 4096)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, cfg.vocab_size, (32,), generator=g).tolist() for _ in range(args.requests)]
    sp = SamplingParams(mode="diffusion", block_size=args.block_size, gamma=args.gamma,
                        max_tokens=args.max_tokens, ignore_eos=True)  # fmt: skip
    print(f"model {model} ({cfg.pattern}, hidden {cfg.hidden_size}); transport {pair.tensor_transport}; "
          f"{args.requests} requests x {args.max_tokens} tokens, S={args.block_size}\n")  # fmt: skip
    print("| run | tok/s | blocks | KiB/block | ms/transfer | busy ctx | busy den | overlap |")
    print("|---|---|---|---|---|---|---|---|")
    runs = [("unpipelined", 1, False)] + [(f"pipelined x{m}", m, True) for m in args.micro_batches]
    for label, micro, pipe in runs:
        ex = RayExecutor(pair)
        eng = Engine(ex, limits, micro_batches=micro, pipeline=pipe)
        eng.generate(prompts[:2], SamplingParams(mode="diffusion", max_tokens=8))  # warm-up
        ex.drain()
        ray.get([pair.context.record_spans.remote(True), pair.denoiser.record_spans.remote(True)])
        ray.get(pair.denoiser.take_transfers.remote())
        bytes0 = ex.delta_bytes
        t0 = time.perf_counter()
        reqs = eng.generate(prompts, sp)
        ex.drain()
        wall = time.perf_counter() - t0
        c_sp, d_sp = ray.get([pair.context.op_spans.remote(), pair.denoiser.op_spans.remote()])
        transfers = ray.get(pair.denoiser.take_transfers.remote())
        blocks = sum(r.usage.context_forwards - 1 for r in reqs)
        c = union([(a, b) for _, a, b in c_sp])
        d = union([(a, b) for _, a, b in d_sp])
        toks = sum(len(r.output_ids) for r in reqs)
        kib = (ex.delta_bytes - bytes0) / max(blocks, 1) / 1024
        ms = 1000 * sum(s for _, s in transfers) / max(len(transfers), 1)
        print(f"| {label} | {toks / wall:.1f} | {blocks} | {kib:.1f} | {ms:.2f} | {length(c) / wall:.2f} | "
              f"{length(d) / wall:.2f} | {intersect(c, d) / wall:.2f} |")  # fmt: skip
    pair.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
