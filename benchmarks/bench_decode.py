"""Decoding benchmark: AR vs mask diffusion (several gamma and block sizes) vs lossless vs mock-AR, at
batch 1 and batched, on the in-process engine. Prints one markdown table.

    python benchmarks/bench_decode.py [--model DIR | --preset tiny] [--prompts 8] [--max-tokens 64]
    python benchmarks/bench_decode.py --compile [--batches 1 8] ...   # eager against compiled steps

Columns: tok/s = generated tokens / wall seconds (all requests of the row); TPF = generated tokens per
forward (den: denoiser forwards, ctx: context forwards incl. prefill, all: both towers); AR agree =
fraction of generated tokens equal to the AR greedy output at the same position.
Performance targets live here, never in tests.
"""

from __future__ import annotations

import argparse
import time

import torch
from step_costs import decode_rate, hf_generate, hf_model, step_table  # benchmarks/ is on sys.path

from twotower.cluster.cli.bench_serve import PROMPTS as CODE_PROMPTS
from twotower.cluster.engine.config import EngineConfig
from twotower.cluster.engine.engine import Engine
from twotower.cluster.engine.loading import LoadedModel, ModelFiles, build_engine, load_model
from twotower.cluster.engine.params import SamplingParams
from twotower.cluster.engine.tokenizer import ByteTokenizer
from twotower.towers.config import preset
from twotower.towers.context import ContextTower
from twotower.towers.denoiser import DenoiserTower
from twotower.towers.init import init_random_


def random_model(name: str) -> LoadedModel:
    cfg = preset(name).replace(vocab_size=max(preset(name).vocab_size, 260))
    ctx = init_random_(ContextTower(cfg).eval(), 0)
    den = init_random_(DenoiserTower(cfg).eval(), 1)
    files = ModelFiles(path=None, config=cfg, has_denoiser=True, tokenizer=ByteTokenizer(cfg.vocab_size))
    return LoadedModel(files, ctx, den)


def run(engine: Engine, prompts: list[str], params: SamplingParams, batched: bool) -> tuple[float, list]:
    """Returns (wall seconds, finished requests in prompt order)."""
    t0 = time.perf_counter()
    if batched:
        reqs = engine.generate(prompts, params)
    else:
        reqs = [engine.generate([p], params)[0] for p in prompts]
    return time.perf_counter() - t0, reqs


def agreement(reqs, ar_reqs) -> float:
    same = total = 0
    for r, a in zip(reqs, ar_reqs, strict=True):
        n = min(len(r.output_ids), len(a.output_ids))
        same += sum(x == y for x, y in zip(r.output_ids[:n], a.output_ids[:n], strict=True))
        total += n
    return same / total if total else 0.0


def configs(args) -> list[tuple[str, SamplingParams]]:
    base = dict(max_tokens=args.max_tokens, ignore_eos=args.ignore_eos)
    out = [("ar", SamplingParams(mode="ar", **base))]
    for s in args.block_sizes:
        out.append((f"lossless S={s}", SamplingParams(mode="lossless", block_size=s, gamma=0.8, **base)))
        out.append((f"lossless S={s} T=1", SamplingParams(mode="lossless", block_size=s, steps_per_block=1,
                                                          **base)))  # fmt: skip
    for s in args.block_sizes:
        for g in args.gammas:
            out.append((f"diffusion S={s} g={g}", SamplingParams(mode="diffusion", block_size=s, gamma=g,
                                                                 steps_per_block=s, **base)))  # fmt: skip
    out.append(("mock_ar", SamplingParams(mode="mock_ar", **base)))
    return out


def compare_compiled(args, model, prompts) -> None:
    """Eager against compiled steps (engine/steps.py), side by side in one run, same requests; then the
    cost of each step kind, and transformers' generate on the same context tower."""
    rows = [("ar", SamplingParams(mode="ar", max_tokens=args.max_tokens, ignore_eos=True)),
            ("diffusion S=16 g=0.8", SamplingParams(mode="diffusion", block_size=16, gamma=0.8,
                                                    max_tokens=args.max_tokens, ignore_eos=True)),
            ("lossless S=16 T=1", SamplingParams(mode="lossless", block_size=16, steps_per_block=1,
                                                 max_tokens=args.max_tokens, ignore_eos=True))]  # fmt: skip
    engines = {eager: build_engine(model, EngineConfig(max_num_seqs=max(args.batches), max_model_len=1024, eager=eager,
                                                       warmup=False)) for eager in (True, False)}  # fmt: skip
    print("| config | batch | eager tok/s | compiled tok/s | x | same tokens |")
    print("|---|---|---|---|---|---|")
    for label, params in rows:
        for b in args.batches:
            ps = (prompts * 8)[:b]
            out = {}
            for eager, eng in engines.items():
                run(eng, ps, params, True)  # compiles what this row needs (compiled engine) / warms up
                secs, reqs = run(eng, ps, params, True)
                out[eager] = (sum(len(r.output_ids) for r in reqs) / secs, [r.output_ids for r in reqs])
            (te, ie), (tc, ic) = out[True], out[False]
            print(f"| {label} | {b} | {te:.1f} | {tc:.1f} | {tc / te:.2f} | {ie == ic} |")
    ex = {("eager" if eager else "compiled"): eng.ex for eager, eng in engines.items()}
    compiled = {**ex["compiled"].ctx.steps.stats.compiled, **ex["compiled"].den.steps.stats.compiled}
    print(f"\ncompile warm-up: {len(compiled)} graphs, {sum(compiled.values()):.1f} s in all "
          f"(first call of each key, this machine)")  # fmt: skip

    times, ops = step_table(ex, args.batches, engines[True].mask_id)
    print("\n| step | batch | eager ms | compiled ms | x | compiled / compiled decode |")
    print("|---|---|---|---|---|---|")
    for (kind, b), t in times.items():
        ratio = t["compiled"] / times[("decode", b)]["compiled"]
        print(f"| {kind} | {b} | {t['eager']:.2f} | {t['compiled']:.2f} | {t['eager'] / t['compiled']:.2f} | "
              f"{ratio:.2f} |")  # fmt: skip
    print("\naten ops dispatched per batch-1 call (eager / compiled): " +
          ", ".join(f"{k} {ops[(k, 'eager')]} / {ops[(k, 'compiled')]}" for k, _ in
                    sorted({(k, 0) for k, _ in ops})))  # fmt: skip

    hf = hf_model(model.context.float())
    if hf is None:
        print("\ntransformers is not installed: no nemotron_h generate baseline")
        return
    prompt = engines[True].tokenizer.encode(prompts[0])
    n = args.max_tokens
    ours = engines[False]

    def ours_gen(k: int) -> list[int]:
        return ours.generate([prompt], SamplingParams(mode="ar", max_tokens=k, ignore_eos=True))[0].output_ids

    same = hf_generate(hf, prompt, n) == ours_gen(n)
    rows = [("end to end (prefill included)", lambda gen: n / min(_timed(gen, n) for _ in range(3))),
            ("decode only", lambda gen: decode_rate(gen, n))]  # fmt: skip
    print(f"\nAR batch 1 against transformers' NemotronHForCausalLM.generate, {n} greedy tokens, same tokens: {same}")
    print("\n| measure | transformers tok/s | compiled twotower tok/s | x |")
    print("|---|---|---|---|")
    for label, rate in rows:
        t_hf = rate(lambda k: hf_generate(hf, prompt, k))
        t_us = rate(ours_gen)
        print(f"| {label} | {t_hf:.1f} | {t_us:.1f} | {t_us / t_hf:.2f} |")


def _timed(gen, n: int) -> float:
    t0 = time.perf_counter()
    gen(n)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint directory")
    ap.add_argument("--preset", default="tiny", help="random-weight preset when no --model")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--block-sizes", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--gammas", type=float, nargs="+", default=[0.5, 0.8, 0.95])
    ap.add_argument("--batch", choices=["1", "all", "both"], default="both")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ignore-eos", action="store_true")
    ap.add_argument("--compile", action="store_true", help="eager against compiled steps instead")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="batch sizes of --compile")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model) if args.model else random_model(args.preset)
    if args.compile:
        name = args.model or f"random {args.preset}"
        print(f"model: {name}; max_tokens {args.max_tokens}; threads {args.threads}; float32\n")
        compare_compiled(args, model, CODE_PROMPTS)
        return
    engine = build_engine(model, EngineConfig(max_num_seqs=64, eager=True))
    prompts = (CODE_PROMPTS * 10)[: args.prompts]
    modes = {"1": [False], "all": [True], "both": [False, True]}[args.batch]
    run(engine, prompts[:2], SamplingParams(mode="diffusion", max_tokens=8), True)  # warm-up
    name = args.model or f"random {args.preset}"
    print(f"model: {name}; {len(prompts)} prompts; max_tokens {args.max_tokens}; threads {args.threads}\n")
    print("| config | batch | tokens | tok/s | TPF den | TPF ctx | TPF all | AR agree | x AR tok/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for batched in modes:
        ar_tps = None
        ar_reqs = None
        for label, params in configs(args):
            secs, reqs = run(engine, prompts, params, batched)
            toks = sum(len(r.output_ids) for r in reqs)
            den = sum(r.usage.denoiser_forwards for r in reqs)
            ctx = sum(r.usage.context_forwards for r in reqs)
            tps = toks / secs
            if ar_reqs is None:
                ar_reqs, ar_tps = reqs, tps
            agree = agreement(reqs, ar_reqs)
            tpf_den = f"{toks / den:.2f}" if den else "-"
            print(f"| {label} | {len(prompts) if batched else 1} | {toks} | {tps:.1f} | {tpf_den} | "
                  f"{toks / ctx:.2f} | {toks / (den + ctx):.2f} | {agree:.3f} | {tps / ar_tps:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
