"""`twotower` command line: generate (more subcommands join as the serving layers land)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

BUNDLED_MODEL = Path(__file__).resolve().parent.parent / "models" / "twotower-tiny"


def _model_path(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    if not (BUNDLED_MODEL / "config.json").is_file():
        sys.exit(f"no model given and no bundled model at {BUNDLED_MODEL}; pass --model PATH")
    return BUNDLED_MODEL


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", default="diffusion", choices=["diffusion", "mock_ar", "ar", "lossless"])
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--steps-per-block", type=int, default=16)
    p.add_argument("--gamma", type=float, default=0.8)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")


def _sampling(a: argparse.Namespace):
    from .sampling import SamplingParams

    return SamplingParams(mode=a.mode, max_tokens=a.max_tokens, temperature=a.temperature, top_k=a.top_k,
                          top_p=a.top_p, seed=a.seed, block_size=a.block_size, steps_per_block=a.steps_per_block,
                          gamma=a.gamma, stop=a.stop, ignore_eos=a.ignore_eos)  # fmt: skip


def cmd_generate(a: argparse.Namespace) -> int:
    from .config import EngineConfig
    from .loading import build_engine, load_model, torch_threads

    torch_threads(a.threads)
    t0 = time.perf_counter()
    model = load_model(_model_path(a.model), a.device, a.dtype)
    engine = build_engine(model, EngineConfig(device=a.device, dtype=a.dtype))
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="twotower", description="Two-tower block-diffusion LM serving")
    sub = parser.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="generate a completion in-process and print per-request stats")
    g.add_argument("prompt")
    g.add_argument("--model", default=None, help="checkpoint directory (default: the bundled model)")
    g.add_argument("--device", default="cpu")
    g.add_argument("--dtype", default=None, choices=[None, "float32", "bfloat16", "float16"])
    g.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    g.add_argument("--quiet", action="store_true", help="print the text at the end, not streamed")
    _add_sampling_args(g)
    g.set_defaults(fn=cmd_generate)
    a = parser.parse_args(argv)
    return a.fn(a)


if __name__ == "__main__":
    sys.exit(main())
