"""The prefix cache on a shared-prefix workload: the same requests with the cache off and on.

    python benchmarks/bench_prefix_cache.py [--model DIR] [--requests 64] [--prefix 512] [--suffix 32]

`--requests` prompts of one `--prefix`-token prefix and distinct `--suffix`-token suffixes (random token
ids, fixed seed) arrive together at an in-process engine (eager steps, float32 on the CPU). Per run:
TTFT p50 / p99 (arrival to first streamed token), prompt tokens the context tower read, output tokens
per second, and whether the outputs of the two runs are identical. Each run starts with one unrelated
warm-up request, so neither pays for first-call costs. Runs alternate off / on `--repeat` times and
the table gives each run; ratios are of medians over runs, measured side by side in one process.

Below it: the bytes one hit's first delta sends to a denoiser mirror, the way the system does it (the
delta carries the seated prefix) and the way it does not (a mirrored cache on the denoiser's device,
which would send the remainder only), from the exact formula that tests/cluster/actors asserts.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from twotower.cluster.engine.config import EngineConfig
from twotower.cluster.engine.loading import build_engine, load_model
from twotower.cluster.engine.params import SamplingParams
from twotower.towers.config import preset
from twotower.towers.pool import bytes_per_token, mamba_bytes_per_slot, prefix_entry_bytes


def workload(vocab: int, n: int, prefix: int, suffix: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    head = [rng.randrange(4, vocab) for _ in range(prefix)]
    return [head + [rng.randrange(4, vocab) for _ in range(suffix)] for _ in range(n)]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def one_run(model, a, cache: bool, prompts: list[list[int]], params: SamplingParams) -> dict:
    cfg = EngineConfig(eager=True, max_num_seqs=a.max_num_seqs, max_prefills_per_step=a.max_prefills,
                       max_model_len=a.prefix + a.suffix + a.max_tokens + 64, prefix_cache=cache,
                       prefix_cache_grid=a.grid, prefix_cache_bytes=a.cache_bytes)  # fmt: skip
    eng = build_engine(model, cfg)
    eng.generate([[5, 6, 7, 8]], params)  # warm-up, shares nothing with the workload
    base = eng.ex.prefix_cache_stats().result()
    t0 = time.monotonic()
    reqs = [eng.add_request(p, params) for p in prompts]
    while eng.has_unfinished():
        eng.step()
    wall = time.monotonic() - t0
    stats = eng.ex.prefix_cache_stats().result()
    read = stats.prefill_tokens - base.prefill_tokens if stats else sum(map(len, prompts))
    ttft = [r.first_token_time - t0 for r in reqs]
    hits = stats.hit_tokens - base.hit_tokens if stats else 0
    return {"cache": "on" if cache else "off", "p50": pct(ttft, 0.5), "p99": pct(ttft, 0.99), "prefill": read,
            "hits": hits, "tok_s": sum(len(r.output_ids) for r in reqs) / wall, "wall": wall,
            "out": [r.output_ids for r in reqs]}  # fmt: skip


def transfer_table(a, cfgs) -> None:
    print(f"\nFirst delta to the denoiser mirror for one hit ({a.prefix}-token prefix seated, {a.suffix}-token "
          f"remainder prefilled), bf16 KV, fp32 SSM state:\n")  # fmt: skip
    print(f"| config | delta carries prefix (chosen) | mirrored cache would send | saved | one entry (G={a.grid}), "
          "which a mirrored cache holds twice |")  # fmt: skip
    print("|---|---|---|---|---|")
    for name, cfg in cfgs:
        kv, mamba = bytes_per_token(cfg, torch.bfloat16), mamba_bytes_per_slot(cfg, torch.bfloat16)
        carried = (a.prefix + a.suffix) * kv + mamba
        mirrored = a.suffix * kv + mamba
        entry = prefix_entry_bytes(cfg, a.grid, torch.bfloat16)
        print(f"| {name} | {carried / 2**20:.2f} MiB | {mirrored / 2**20:.2f} MiB | "
              f"{100 * (carried - mirrored) / carried:.1f}% | {entry / 2**20:.2f} MiB |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory (default: the bundled model)")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prefix", type=int, default=512, help="shared prefix tokens")
    ap.add_argument("--suffix", type=int, default=32, help="distinct suffix tokens per request")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--mode", default="diffusion")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--gamma", type=float, default=0.8)
    ap.add_argument("--grid", type=int, default=256, help="prefix_cache_grid")
    ap.add_argument("--cache-bytes", type=int, default=1 << 30, help="prefix_cache_bytes")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-prefills", type=int, default=EngineConfig.max_prefills_per_step,
                    help="max_prefills_per_step: requests admitted per engine step")
    ap.add_argument("--repeat", type=int, default=2, help="off/on pairs")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = load_model(a.model, dtype="float32")
    prompts = workload(model.config.vocab_size, a.requests, a.prefix, a.suffix)
    params = SamplingParams(mode=a.mode, max_tokens=a.max_tokens, block_size=a.block_size, gamma=a.gamma,
                            ignore_eos=True, temperature=0.0)  # fmt: skip
    print(f"{a.requests} requests: {a.prefix}-token shared prefix + {a.suffix}-token suffixes, all arriving at once; "
          f"{a.mode} S={a.block_size} gamma={a.gamma}, {a.max_tokens} tokens each; grid {a.grid}; "
          f"{torch.get_num_threads()} threads, CPU float32\n")  # fmt: skip
    print("| run | cache | TTFT p50 s | TTFT p99 s | prefill tokens | hit tokens | tok/s | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    runs = []
    for i in range(a.repeat):
        for cache in (False, True):
            r = one_run(model, a, cache, prompts, params)
            runs.append(r)
            print(f"| {i + 1} | {r['cache']} | {r['p50']:.3f} | {r['p99']:.3f} | {r['prefill']} | {r['hits']} | "
                  f"{r['tok_s']:.1f} | {r['wall']:.2f} |", flush=True)  # fmt: skip
    med = {c: {k: statistics.median(r[k] for r in runs if r["cache"] == c) for k in ("p50", "p99", "prefill", "tok_s")}
           for c in ("off", "on")}  # fmt: skip
    same = all(r["out"] == runs[0]["out"] for r in runs)
    off, on = med["off"], med["on"]
    print(f"\nmedians, off / on: TTFT p50 {off['p50'] / on['p50']:.2f}x lower, p99 {off['p99'] / on['p99']:.2f}x "
          f"lower; prefill tokens cut by {100 * (1 - on['prefill'] / off['prefill']):.1f}%; tok/s "
          f"{on['tok_s'] / off['tok_s']:.2f}x; outputs identical across all runs: {same}")  # fmt: skip
    transfer_table(a, [("bundled (twotower-tiny)", model.config), ("nemotron-3-nano-30b-a3b",
                                                                   preset("nemotron-3-nano-30b-a3b"))])  # fmt: skip
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
