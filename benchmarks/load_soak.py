"""Soak test: C concurrent gRPC streams against a running `twotower serve` for a fixed time.

Each of C clients sends requests back to back (modes and prompts in rotation) until the time is up.
A request is `completed` when its stream ends with a finished chunk carrying every token it asked for
(ignore_eos, so the count is known), `failed` when the call ends with a gRPC error, and `lost` when it
ends without either (no finished chunk, or fewer tokens than asked): the number that must be 0.
Printed: completed / failed / lost, latency p50/p99, tokens/s, and the resident memory of the serve
process tree (the CLI, Ray's processes, replicas and tower actors) at start and at end.

    twotower serve --eager &             # the default bundled model, 127.0.0.1
    python benchmarks/load_soak.py --pid $(pgrep -f 'twotower.cluster.cli serve') --seconds 180
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.listeners import process_tree  # noqa: E402  (the processes under the serve CLI)

PROMPTS = ["def parse_args(", "import os\nimport sys\n\n\ndef main():\n", "class Config:\n    def __init__(self",
           "    for i in range(", "def read_file(path):\n    with open(path", "try:\n    import "]  # fmt: skip
MODES = ["MODE_DIFFUSION", "MODE_AR", "MODE_LOSSLESS", "MODE_DIFFUSION"]


def rss_mib(root: int) -> float:
    total = 0
    for pid in process_tree(root):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


async def client(i: int, stub, pb, end: float, max_tokens: int, out: dict) -> None:
    n = 0
    while time.monotonic() < end:
        mode = MODES[(i + n) % len(MODES)]
        sp = pb.SamplingParams(mode=getattr(pb, mode), max_tokens=max_tokens, ignore_eos=True)
        req = pb.GenerateRequest(prompt_text=PROMPTS[(i + n) % len(PROMPTS)], sampling=sp)
        n += 1
        t0, tokens, finished = time.perf_counter(), 0, False
        try:
            async for chunk in stub.Generate(req, timeout=300):
                tokens += len(chunk.token_ids)
                finished = finished or chunk.finished
        except Exception as e:  # grpc.aio.AioRpcError
            code = e.code() if hasattr(e, "code") else type(e).__name__
            out["failed"].append(f"{mode}: {code}")
            continue
        if finished and tokens == max_tokens:
            out["completed"].append(time.perf_counter() - t0)
            out["tokens"] += tokens
        else:
            out["lost"].append(f"{mode}: finished={finished} tokens={tokens}/{max_tokens}")


async def main(a: argparse.Namespace) -> None:
    import grpc

    from twotower.protos import pb2 as pb
    from twotower.protos import pb2_grpc

    out = {"completed": [], "failed": [], "lost": [], "tokens": 0}
    mem0 = rss_mib(a.pid)
    t0 = time.monotonic()
    async with grpc.aio.insecure_channel(a.target) as ch:
        stub = pb2_grpc.TwoTowerStub(ch)
        await asyncio.gather(*(client(i, stub, pb, t0 + a.seconds, a.max_tokens, out) for i in range(a.concurrency)))
    wall = time.monotonic() - t0
    mem1 = rss_mib(a.pid)
    lat = out["completed"]
    print(f"| streams | seconds | completed | failed | lost | latency p50 s | latency p99 s | tok/s "
          f"| RSS start MiB | RSS end MiB | growth |\n|---|---|---|---|---|---|---|---|---|---|---|\n"
          f"| {a.concurrency} | {wall:.0f} | {len(lat)} | {len(out['failed'])} | {len(out['lost'])} "
          f"| {pct(lat, 0.5):.2f} | {pct(lat, 0.99):.2f} | {out['tokens'] / wall:.1f} | {mem0:.0f} | {mem1:.0f} "
          f"| {100 * (mem1 / mem0 - 1):+.1f}% |")  # fmt: skip
    for kind in ("failed", "lost"):
        if out[kind]:
            print(f"{kind}: {dict(collections.Counter(out[kind]))}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default="127.0.0.1:9000", help="gRPC address of twotower serve")
    p.add_argument("--pid", type=int, required=True, help="pid of the `twotower serve` process (memory)")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--seconds", type=float, default=180.0)
    p.add_argument("--max-tokens", type=int, default=48)
    asyncio.run(main(p.parse_args()))
