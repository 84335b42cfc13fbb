"""GPU check, for a session that is lent a GPU machine. One script, well under 8 minutes:

  1. environment: torch / CUDA / GPU count, which optional fast kernels import (mamba-ssm,
     causal-conv1d, flash-attn, cupy);
  2. kernels on the GPU against their PyTorch references (SSD scan, attention, MoE dispatch);
  3. state transfer: with 2+ GPUs a tower pair on local Ray over NCCL; with 1 GPU the same-device
     path (delta export + apply on one device) — bytes, ms and GB/s per block;
  4. our Triton kernels against their twins and against mamba-ssm (benchmarks/kernel_check.py);
  5. eager against CUDA-graph-captured tower steps, per step kind and batch bucket, and token-identical
     greedy output of the two in every mode;
  6. tokens/s of every mode, eager and captured, on a mid-size random config (preset "small", bf16).

    python benchmarks/gpu_check.py [--device cuda] [--out docs/results/gpu_check.txt]

Runs on CPU too (`--device cpu --preset tiny --dtype float32 --threads 1 --max-tokens 32`) so it is
checked before a GPU is ever lent.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

import torch


def log(msg: str, out) -> None:
    print(msg, flush=True)
    if out:
        out.write(msg + "\n")
        out.flush()


def sync(dev: str) -> None:
    if dev.startswith("cuda"):
        torch.cuda.synchronize()


def check_kernels(dev: str, out) -> None:
    from twotower import kernels
    from twotower.kernels.attention import attention_ref

    g = torch.Generator(device="cpu").manual_seed(0)
    b, l, h, p, gr, n = 2, 200, 8, 64, 2, 64
    x = torch.randn(b, l, h, p, generator=g).to(dev)
    dt = torch.rand(b, l, h, generator=g).mul(0.1).to(dev)
    A = -torch.rand(h, generator=g).add(0.5).to(dev)
    B = torch.randn(b, l, gr, n, generator=g).to(dev)
    C = torch.randn(b, l, gr, n, generator=g).to(dev)
    D = torch.ones(h).to(dev)
    y_fast, s_fast = kernels.ssd_scan(x, dt, A, B, C, D, None, 64)
    y_ref, s_ref = kernels.ssd_scan_ref(x, dt, A, B, C, D, None, 64)
    log(f"kernels: ssd_scan fast-vs-ref max|dy| {float((y_fast - y_ref).abs().max()):.2e} "
        f"max|dstate| {float((s_fast - s_ref).abs().max()):.2e}", out)  # fmt: skip
    q = torch.randn(2, 16, 16, 64, generator=g).to(dev, torch.bfloat16)
    k = torch.randn(2, 300, 2, 64, generator=g).to(dev, torch.bfloat16)
    v = torch.randn(2, 300, 2, 64, generator=g).to(dev, torch.bfloat16)
    d = (kernels.attention(q, k, v, None).float() - attention_ref(q, k, v, None).float()).abs().max()
    log(f"kernels: attention (flash/sdpa) vs ref max|d| {float(d):.2e} (bf16)", out)
    xs = torch.randn(64, 256, generator=g).to(dev, torch.bfloat16)
    idx = torch.randint(0, 16, (64, 4), generator=g).to(dev)
    w = torch.rand(64, 4, generator=g).to(dev)
    up = torch.randn(16, 128, 256, generator=g).to(dev, torch.bfloat16) * 0.05
    down = torch.randn(16, 256, 128, generator=g).to(dev, torch.bfloat16) * 0.05
    d = kernels.moe_experts(xs, idx, w, up, down).float() - kernels.moe_experts_ref(xs, idx, w, up, down).float()
    log(f"kernels: moe_experts vs dense ref max|d| {float(d.abs().max()):.2e} (bf16)", out)


def same_device_transfer(ctx, den, dev: str, out) -> None:
    """The state delta of one committed block, context pool -> a denoiser mirror pool on the same device."""
    from twotower.cluster.engine.denoiser_runner import DenoiserRunner
    from twotower.cluster.engine.runners import ContextRunner, PoolLimits

    b, prompt, S = 8, 512, 16
    limits = PoolLimits(b, 2048, 64)
    src, dst = ContextRunner(ctx, limits), DenoiserRunner(den, limits=limits)
    g = torch.Generator().manual_seed(0)
    src.add_rows("x", [torch.randint(4, ctx.cfg.vocab_size, (prompt,), generator=g).tolist() for _ in range(b)],
                 None, mirror=True)  # fmt: skip
    dst.apply_delta("x", src.take_delta("x"))
    times, sizes = [], []
    for _ in range(5):
        src.extend("x", torch.full((b, S), 7), torch.full((b,), S))
        sync(dev)
        t0 = time.perf_counter()
        sizes.append(dst.apply_delta("x", src.take_delta("x")))
        sync(dev)
        times.append(time.perf_counter() - t0)
    t = sorted(times)[len(times) // 2]
    log(f"transfer (same device): {sizes[0] / 2**20:.2f} MiB per block of {S} x {b} rows, "
        f"{1000 * t:.2f} ms, {sizes[0] / t / 1e9:.2f} GB/s", out)  # fmt: skip


def pair_transfer(model: str, out) -> None:
    import ray

    from twotower.cluster.actors.config import PairConfig
    from twotower.cluster.actors.pair import TowerPair
    from twotower.cluster.actors.ray_executor import RayExecutor

    ray.init(include_dashboard=False, log_to_driver=False)
    pair = TowerPair(model, PairConfig(use_gpus=True, transport="nccl", replica_cpus=0.1))
    ex = RayExecutor(pair)
    b, S = 8, 16
    ex.add_rows("x", [[5] * 512] * b, None, uses_denoiser=True).result()
    ex.drain()
    ray.get(pair.denoiser.take_transfers.remote())
    for _ in range(5):
        ex.extend("x", torch.full((b, S), 7), torch.full((b,), S))
        ex.drain()
    tr = ray.get(pair.denoiser.take_transfers.remote())
    n, s = tr[-1]
    log(f"transfer (nccl, 2 GPUs): {n / 2**20:.2f} MiB per block, {1000 * s:.2f} ms, {n / s / 1e9:.2f} GB/s", out)
    pair.shutdown()
    ray.shutdown()


def engines(ctx, den, dev: str, compile: bool | str, cache=None):
    from twotower.cluster.engine.engine import Engine
    from twotower.cluster.engine.executor import InProcessExecutor, PoolLimits
    from twotower.cluster.engine.params import ModelLimits

    ex = InProcessExecutor(ctx, den, PoolLimits(32, 8192, 64, prefix_cache=cache), compile=compile)
    return ex, Engine(ex, ModelLimits(ctx.cfg.vocab_size, 8192))


def captured_steps(ctx, den, dev: str, out) -> dict:
    """Eager against captured steps (the "eager" Dynamo backend under CUDA graphs: capture in seconds;
    Inductor's kernels are not in this figure), per step kind and bucket; same greedy tokens in every mode."""
    from step_costs import step_table

    from twotower.cluster.engine.params import SamplingParams

    built = {label: engines(ctx, den, dev, c) for label, c in (("eager", False), ("captured", "eager"))}
    t0 = time.perf_counter()
    times, _ = step_table({k: ex for k, (ex, _) in built.items()}, [1, 8, 32], 3, reps=10, count_ops=False)
    log(f"\nsteps: eager vs captured ms (built in {time.perf_counter() - t0:.1f} s)", out)
    log("| step | batch | eager ms | captured ms | x |\n|---|---|---|---|---|", out)
    for (kind, b), t in times.items():
        log(f"| {kind} | {b} | {t['eager']:.3f} | {t['captured']:.3f} | {t['eager'] / t['captured']:.2f} |", out)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(4, ctx.cfg.vocab_size, (40,), generator=g).tolist() for _ in range(3)]
    for mode in ("ar", "diffusion", "lossless", "mock_ar"):
        sp = SamplingParams(mode=mode, max_tokens=24, ignore_eos=True, block_size=16, gamma=0.8)
        got = {k: [r.output_ids for r in eng.generate(prompts, sp)] for k, (_, eng) in built.items()}
        log(f"steps: {mode} captured tokens == eager tokens: {got['captured'] == got['eager']}", out)
    return {k: eng for k, (_, eng) in built.items()}


def prefix_cache(ctx, den, dev: str, out, compile: bool | str = "eager") -> None:
    """The prefix cache off vs on, same steps: 32 requests sharing a 512-token prefix (+ 32-token tails)
    arriving together; TTFT p50, prefill tokens, and whether the tokens match (bf16 may differ where
    batch shapes differ; the float32 identity is tested on CPU)."""
    from twotower.cluster.engine.config import PrefixCacheConfig
    from twotower.cluster.engine.params import SamplingParams

    g = torch.Generator().manual_seed(2)
    head = torch.randint(4, ctx.cfg.vocab_size, (512,), generator=g).tolist()
    prompts = [head + torch.randint(4, ctx.cfg.vocab_size, (32,), generator=g).tolist() for _ in range(32)]
    warm = [torch.randint(4, ctx.cfg.vocab_size, (544,), generator=g).tolist() for _ in range(2)]
    for mode in ("ar", "diffusion"):
        sp = SamplingParams(mode=mode, max_tokens=32, ignore_eos=True, block_size=16, gamma=0.8)
        res = {}
        for label, cache in (("off", None), ("on", PrefixCacheConfig(256, 1 << 30))):
            ex, eng = engines(ctx, den, dev, compile, cache)
            eng.generate([[5, 6, 7]], sp)
            eng.generate(warm, sp)  # builds the step keys; shares nothing with the measured prompts
            sync(dev)
            t0 = time.monotonic()
            reqs = [eng.add_request(p, sp) for p in prompts]
            while eng.has_unfinished():
                eng.step()
            sync(dev)
            ttft = sorted(r.first_token_time - t0 for r in reqs)[len(reqs) // 2]
            read = sum(len(p) for p in prompts) - sum(r.usage.cached_tokens for r in reqs)
            res[label] = (ttft, read, [r.output_ids for r in reqs])
        (t_off, r_off, o_off), (t_on, r_on, o_on) = res["off"], res["on"]
        log(f"prefix cache: {mode:9s} TTFT p50 off {t_off * 1e3:.1f} ms on {t_on * 1e3:.1f} ms ({t_off / t_on:.2f}x); "
            f"prefill tokens {r_off} -> {r_on}; tokens identical: {o_off == o_on}", out)  # fmt: skip


def throughput(engs: dict, ctx, dev: str, out, max_tokens: int) -> None:
    from twotower.cluster.engine.params import SamplingParams

    g = torch.Generator().manual_seed(0)
    for batch in (1, 16):
        prompts = [torch.randint(4, ctx.cfg.vocab_size, (128,), generator=g).tolist() for _ in range(batch)]
        for mode, extra in (("ar", {}), ("diffusion", {"gamma": 0.8}), ("lossless", {}), ("mock_ar", {})):
            # random weights draft ~1 token per verify: keep lossless short
            n = max_tokens if mode != "lossless" else max_tokens // 4
            sp = SamplingParams(mode=mode, max_tokens=n, ignore_eos=True, block_size=16, **extra)
            row = []
            for label, eng in engs.items():
                eng.generate(prompts, sp)  # warm-up: builds (compiles, captures) every step key the run needs
                sync(dev)
                t0 = time.perf_counter()
                reqs = eng.generate(prompts, sp)
                sync(dev)
                dt = time.perf_counter() - t0
                toks = sum(len(r.output_ids) for r in reqs)
                den_f = sum(r.usage.denoiser_forwards for r in reqs)
                row.append(f"{label} {toks / dt:9.1f} tok/s")
            log(f"throughput: batch {batch:2d} {mode:9s} " + "  ".join(row) +
                f"  tokens/denoiser-forward {toks / den_f if den_f else 0:.2f}", out)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", default=None)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (set 1 on a shared CPU)")
    a = ap.parse_args()
    out = open(a.out, "w") if a.out else None  # noqa: SIM115
    dev = a.device
    if a.threads:
        torch.set_num_threads(a.threads)
    n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    log(f"torch {torch.__version__}, cuda {torch.version.cuda}, GPUs {n_gpu}"
        + (f" ({torch.cuda.get_device_name(0)})" if n_gpu else ""), out)  # fmt: skip
    for name in ("mamba_ssm", "causal_conv1d", "flash_attn", "cupy"):
        try:
            importlib.import_module(name)
            ok = "yes"
        except Exception as e:  # noqa: BLE001
            ok = f"no ({type(e).__name__})"
        log(f"package {name}: {ok}", out)
    if dev.startswith("cuda") and not n_gpu:
        sys.exit("no GPU: run with --device cpu --preset tiny")
    t0 = time.perf_counter()
    check_kernels(dev, out)
    from twotower.towers.config import preset
    from twotower.towers.context import ContextTower
    from twotower.towers.denoiser import DenoiserTower
    from twotower.towers.init import cast_model, init_random_

    cfg = preset(a.preset)
    dtype = getattr(torch, a.dtype)
    ctx = cast_model(init_random_(ContextTower(cfg), 0), dtype).to(dev).eval()
    den = cast_model(init_random_(DenoiserTower(cfg), 1), dtype).to(dev).eval()
    n = sum(p.numel() for p in ctx.parameters())
    log(f"model: preset {a.preset} ({cfg.pattern}, hidden {cfg.hidden_size}), {n / 1e6:.1f}M params per tower, "
        f"{a.dtype} on {dev}", out)  # fmt: skip
    same_device_transfer(ctx, den, dev, out)
    if n_gpu >= 2:
        import tempfile

        from twotower.towers.checkpoint import save_twotower

        path = os.path.join(tempfile.mkdtemp(), "m")
        save_twotower(path, ctx, den)
        pair_transfer(path, out)
    import kernel_check  # benchmarks/ is on sys.path (the script's directory)

    kernel_check.run(dev, log=lambda m: log(m, out), budget_s=90.0)
    engs = captured_steps(ctx, den, dev, out)  # on CPU: traced graphs, not captured (checks the script)
    throughput(engs, ctx, dev, out, a.max_tokens)
    prefix_cache(ctx, den, dev, out)
    log(f"total {time.perf_counter() - t0:.1f} s", out)


if __name__ == "__main__":
    main()
