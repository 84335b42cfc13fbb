"""Start-up warm-up of compiled steps: how long an engine with the serving defaults (EngineConfig(): compiled,
warm-up on) takes to build its start-up step set, cold (an empty TorchInductor cache) and warm (the cache the
cold run filled, as on a restart of the same machine or image).

    python benchmarks/bench_warmup.py [--model DIR] [--max-num-seqs 32] [--threads 1]

Each measurement runs in a fresh Python process, so nothing compiled in one is reused in memory by the next.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

CHILD = """
import json, sys, time, torch
torch.set_num_threads({threads})
from twotower.cluster.engine.config import EngineConfig
from twotower.cluster.engine.loading import build_engine, load_model
model = load_model({model!r})
t0 = time.perf_counter()
eng = build_engine(model, EngineConfig(max_num_seqs={seqs}))
secs = time.perf_counter() - t0
graphs = len(eng.ex.ctx.steps.graphs) + len(eng.ex.den.steps.graphs)
print(json.dumps({{"seconds": secs, "graphs": graphs}}))
"""


def measure(model: str | None, seqs: int, threads: int, cache: str) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
    code = CHILD.format(threads=threads, model=model, seqs=seqs)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the bundled model)")
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        cold = measure(a.model, a.max_num_seqs, a.threads, cache)
        warm = measure(a.model, a.max_num_seqs, a.threads, cache)
    print(f"model: {a.model or 'bundled'}; max_num_seqs {a.max_num_seqs}; torch threads {a.threads}; "
          f"{os.cpu_count()} cores; {time.perf_counter() - t0:.0f} s in all\n")
    print("| inductor cache | graphs | warm-up s | s per graph |")
    print("|---|---|---|---|")
    for label, m in (("cold (empty)", cold), ("warm (filled by the cold run)", warm)):
        print(f"| {label} | {m['graphs']} | {m['seconds']:.1f} | {m['seconds'] / m['graphs']:.2f} |")


if __name__ == "__main__":
    main()
