"""`twotower` command line: generate, eval, serve, scale, bench-serve. Each command imports what it needs
when it runs, so `twotower scale` never loads torch's towers or Ray Serve."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from twotower.cluster.engine.config import DTYPES  # plain dataclasses: importing them loads no torch
from twotower.cluster.engine.params import MODES, SamplingParams

from .errors import fail


class DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each default, except where there is none to show (None, a flag's False, [])."""

    def _get_help_string(self, action: argparse.Action) -> str:
        d = action.default
        if d is None or d is False or d == [] or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def _model_path(arg: str | None) -> Path:
    from twotower.cluster.engine.loading import resolve_model

    try:
        return resolve_model(arg)
    except FileNotFoundError as e:
        fail(str(e), 2)


def _check_device(device: str) -> None:
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError as e:
        fail(f"--device: {e}", 2)
    if dev.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {device}: this machine has no CUDA device (torch {torch.__version__}); use --device cpu", 2)


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    d = SamplingParams()  # the one home of the defaults
    p.add_argument("--mode", default=d.mode, choices=MODES, help="decoding mode")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=d.top_k, help="sample from the k most likely (0 = all)")
    p.add_argument("--top-p", type=float, default=d.top_p, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=d.seed, help="sampling seed (default: a random one)")
    p.add_argument("--block-size", type=int, default=d.block_size, help="tokens per block S")
    p.add_argument("--steps-per-block", type=int, default=d.steps_per_block, help="denoiser steps per block T "
                   "(default: S)")  # fmt: skip
    p.add_argument("--gamma", type=float, default=d.gamma, help="confidence threshold for unmasking")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence")


def _sampling(a: argparse.Namespace) -> SamplingParams:
    return SamplingParams(mode=a.mode, max_tokens=a.max_tokens, temperature=a.temperature, top_k=a.top_k,
                          top_p=a.top_p, seed=a.seed, block_size=a.block_size, steps_per_block=a.steps_per_block,
                          gamma=a.gamma, stop=a.stop, ignore_eos=a.ignore_eos)  # fmt: skip


def cmd_generate(a: argparse.Namespace) -> int:
    from twotower.cluster.engine.config import EngineConfig
    from twotower.cluster.engine.loading import build_engine, load_model, torch_threads

    torch_threads(a.threads)
    _check_device(a.device)
    t0 = time.perf_counter()
    model = load_model(_model_path(a.model), a.device, a.dtype)
    # eager unless --compile: compiling costs seconds per step kind and bucket on a CPU (warmed lazily
    # here, since one request uses few of them)
    engine = build_engine(model, EngineConfig(device=a.device, dtype=a.dtype, eager=not a.compile, warmup=False))
    load_s = time.perf_counter() - t0
    try:
        req = engine.add_request(a.prompt, _sampling(a))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t1 = time.perf_counter()
    text = []
    while not req.finished:
        for out in engine.step():
            if out.request_id == req.request_id:
                text.append(out.text)
                if not a.quiet:
                    print(out.text, end="", flush=True)
    gen_s = time.perf_counter() - t1
    if a.quiet:
        print("".join(text), end="")
    u = req.usage
    print(
        f"\n--\nmode={a.mode} tokens={u.completion_tokens} finish={req.finish_reason.value} "
        f"denoiser_forwards={u.denoiser_forwards} context_forwards={u.context_forwards} "
        f"tokens/forward={u.tokens_per_forward:.2f} (denoiser {u.tokens_per_denoiser_forward:.2f}, "
        f"context {u.tokens_per_context_forward:.2f}) tokens/s={u.completion_tokens / gen_s:.1f} "
        f"load={load_s:.2f}s seed={req.seed}",
        file=sys.stderr,
    )
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    from twotower.cluster.engine.config import EngineConfig
    from twotower.cluster.engine.loading import build_engine, load_model, torch_threads

    from . import evaluation as ev

    torch_threads(a.threads)
    path = _model_path(a.model)
    engine = build_engine(load_model(path), EngineConfig(max_num_seqs=max(64, a.prompts), eager=True))
    prompts = ev.heldout_prompts(a.prompts, seed=a.seed)
    print(f"model {path}: {len(prompts)} held-out prompts, max_tokens {a.max_tokens}", file=sys.stderr)
    configs = ev.grid(a.block_sizes, a.gammas, a.max_tokens, tuple(a.few_steps))
    rows = ev.evaluate(engine, prompts, configs, a.speed_prompts,
                       log=lambda m: print(m, file=sys.stderr))  # fmt: skip
    text = ev.table(rows)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    if a.png:
        ev.plot(rows, a.png, f"{path.name}: {len(prompts)} held-out prompts")
        print(f"plot: {a.png}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    from twotower.cluster.engine.version import version

    from . import serving

    fmt = {"formatter_class": DefaultsHelp}
    parser = argparse.ArgumentParser(prog="twotower", description="Two-tower block-diffusion LM serving", **fmt)
    parser.add_argument("--version", action="version", version=f"twotower {version()}")
    sub = parser.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="generate a completion in-process and print per-request stats", **fmt)
    g.add_argument("prompt", help="the text to complete")
    g.add_argument("--model", default=None, help="checkpoint directory (default: the bundled model)")
    g.add_argument("--device", default="cpu", help="torch device of both towers")
    g.add_argument("--dtype", default=None, choices=DTYPES, help="default: float32 on CPU, else the checkpoint's")
    g.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    g.add_argument("--quiet", action="store_true", help="print the text at the end, not streamed")
    g.add_argument("--compile", action="store_true", help="compiled tower steps (engine/steps.py) instead of eager")
    _add_sampling_args(g)
    g.set_defaults(fn=cmd_generate)

    e = sub.add_parser("eval", help="throughput / quality trade-off on held-out Python files (table + PNG)", **fmt)
    e.add_argument("--model", default=None, help="checkpoint directory (default: the bundled model)")
    e.add_argument("--prompts", type=int, default=48, help="held-out prompts")
    e.add_argument("--max-tokens", type=int, default=48, help="tokens per completion")
    e.add_argument("--block-sizes", type=int, nargs="+", default=[4, 8, 16, 32], help="S values of the grid")
    e.add_argument("--gammas", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9, 0.95, 0.99], help="gamma values")
    e.add_argument("--few-steps", type=int, nargs="*", default=[4, 2], help="also diffusion at gamma 0.8 with "
                   "these steps per block T < S (the fixed-k end)")  # fmt: skip
    e.add_argument("--speed-prompts", type=int, default=6, help="prompts timed at batch 1 per config")
    e.add_argument("--seed", type=int, default=0, help="picks the held-out prompts")
    e.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    e.add_argument("--out", default=None, help="write the table (markdown) here")
    e.add_argument("--png", default=None, help="write the trade-off plot here")
    e.set_defaults(fn=cmd_eval)

    s = sub.add_parser("serve", help="serve the model (HTTP OpenAI-compatible + gRPC) on Ray Serve", **fmt)
    serving.add_serve_args(s)
    s.set_defaults(fn=serving.cmd_serve)

    c = sub.add_parser("scale", help="show or change the number of tower pairs (dashboard REST API)", **fmt)
    serving.add_scale_args(c)
    c.set_defaults(fn=serving.cmd_scale)
    b = sub.add_parser("bench-serve", help="gRPC load generator with a concurrency sweep", **fmt)
    b.add_argument("--target", default="127.0.0.1:9000", help="gRPC address")
    b.add_argument("--app", default="twotower", help="Serve application (gRPC metadata)")
    b.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16], help="streams in flight, per level")
    b.add_argument("--requests", type=int, default=16, help="requests per concurrency level (at least C)")
    d = SamplingParams()
    b.add_argument("--mode", default=d.mode, choices=MODES, help="decoding mode")
    b.add_argument("--max-tokens", type=int, default=64, help="per request (the benchmark's workload)")
    b.add_argument("--block-size", type=int, default=d.block_size, help="tokens per block S")
    b.add_argument("--gamma", type=float, default=d.gamma, help="confidence threshold")
    b.add_argument("--ignore-eos", action="store_true", help="generate max-tokens every time")
    b.add_argument("--slo-ttft", type=float, default=1.0, help="goodput SLO on time to first token (s)")
    b.add_argument("--slo-itl", type=float, default=0.5, help="goodput SLO on mean inter-block latency (s)")
    b.add_argument("--in-process", default=None, metavar="MODEL", help="also time an in-process engine")
    b.set_defaults(fn=lambda a: __import__("twotower.cluster.cli.bench_serve", fromlist=["main"]).main(a))

    a = parser.parse_args(argv)
    return a.fn(a)


if __name__ == "__main__":
    sys.exit(main())
