"""`twotower bench-serve`: a load generator over gRPC with a concurrency sweep.

For each concurrency C, C clients loop over the request set until each has sent its share; per request
we record time to first token (TTFT), the gaps between streamed chunks (inter-block latency), tokens
and forwards. Printed per C: requests/s, tokens/s, TTFT p50/p95, inter-block p50/p95, tokens per
forward, and goodput = requests/s that met both SLOs (TTFT and mean inter-block latency).
`--in-process` also runs the same requests on an in-process engine (batched, same model), the
reference throughput without Ray, Serve or gRPC.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass

PROMPTS = [
    "def parse_args(",
    "import os\nimport sys\n\n\ndef main():\n",
    "class Config:\n    def __init__(self",
    "    for i in range(",
    "def read_file(path):\n    with open(path",
    "if __name__ == '__main__':\n",
    "try:\n    import ",
    "def __repr__(self):\n        return ",
]


@dataclass
class Result:
    ttft: float
    gaps: list[float]
    tokens: int
    forwards: int
    seconds: float


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def _one(stub, pb, prompt: str, sampling, metadata) -> Result:
    t0 = time.perf_counter()
    last = None
    ttft, gaps, tokens, forwards = float("nan"), [], 0, 0
    async for chunk in stub.Generate(pb.GenerateRequest(prompt_text=prompt, sampling=sampling), metadata=metadata):
        now = time.perf_counter()
        if last is None:
            ttft = now - t0
        else:
            gaps.append(now - last)
        last = now
        tokens += len(chunk.token_ids)
        forwards = chunk.usage.denoiser_forwards + chunk.usage.context_forwards
    return Result(ttft, gaps, tokens, forwards, time.perf_counter() - t0)


async def run_level(target: str, app: str, concurrency: int, n_requests: int, sampling) -> tuple[float, list[Result]]:
    import grpc

    from twotower.protos import twotower_v1_pb2 as pb
    from twotower.protos import twotower_v1_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(target) as ch:
        stub = pb_grpc.TwoTowerStub(ch)
        md = (("application", app),)
        queue = list(range(n_requests))
        results: list[Result] = []

        async def client() -> None:
            while queue:
                i = queue.pop()
                results.append(await _one(stub, pb, PROMPTS[i % len(PROMPTS)], sampling, md))

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return time.perf_counter() - t0, results


def in_process_throughput(model: str, n_requests: int, params) -> float:
    from twotower.cluster.engine.config import EngineConfig
    from twotower.cluster.engine.loading import build_engine, load_model

    engine = build_engine(load_model(model), EngineConfig(max_num_seqs=max(64, n_requests), eager=True))
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n_requests)]
    engine.generate(prompts[:2], params)  # warm-up
    t0 = time.perf_counter()
    reqs = engine.generate(prompts, params)
    return sum(len(r.output_ids) for r in reqs) / (time.perf_counter() - t0)


def main(a) -> int:
    from twotower.cluster.ingress.grpc_convert import mode_value
    from twotower.protos import twotower_v1_pb2 as pb

    mode = mode_value(a.mode)
    sampling = pb.SamplingParams(mode=mode, max_tokens=a.max_tokens, block_size=a.block_size, gamma=a.gamma,
                                 ignore_eos=a.ignore_eos)  # fmt: skip
    print(f"target {a.target} app {a.app}; mode {a.mode} S={a.block_size} gamma={a.gamma}; "
          f"max_tokens {a.max_tokens}; SLO: TTFT <= {a.slo_ttft} s, inter-block <= {a.slo_itl} s\n")  # fmt: skip
    print(
        "| concurrency | requests | req/s | tok/s | TTFT p50 | TTFT p95 | inter-block p50 | inter-block p95 "
        "| tokens/forward | goodput req/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for c in a.concurrency:
        n = max(a.requests, c)
        secs, res = asyncio.run(run_level(a.target, a.app, c, n, sampling))
        gaps = [g for r in res for g in r.gaps]
        toks = sum(r.tokens for r in res)
        fw = sum(r.forwards for r in res)
        good = sum(1 for r in res if r.ttft <= a.slo_ttft and (statistics.fmean(r.gaps) if r.gaps else 0) <= a.slo_itl)
        print(f"| {c} | {n} | {n / secs:.2f} | {toks / secs:.1f} | {_pct([r.ttft for r in res], 0.5):.3f} | "
              f"{_pct([r.ttft for r in res], 0.95):.3f} | {_pct(gaps, 0.5):.3f} | {_pct(gaps, 0.95):.3f} | "
              f"{toks / fw if fw else 0:.2f} | {good / secs:.2f} |")  # fmt: skip
    if a.in_process:
        from twotower.cluster.engine.params import SamplingParams

        params = SamplingParams(mode=a.mode, max_tokens=a.max_tokens, block_size=a.block_size, gamma=a.gamma,
                                ignore_eos=a.ignore_eos)  # fmt: skip
        n = max(a.requests, max(a.concurrency))
        print(f"\nin-process engine, same {n} requests batched: "
              f"{in_process_throughput(a.in_process, n, params):.1f} tok/s")  # fmt: skip
    return 0
