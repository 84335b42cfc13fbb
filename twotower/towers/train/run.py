"""Train the bundled two-tower model end to end:

    python -m twotower.towers.train.run --out twotower/models/twotower-tiny \
        --minutes-ar 60 --minutes-denoiser 60 --seed 0

corpus (CPython stdlib source) -> byte-level BPE (4096) -> AR context tower -> denoiser (frozen context
tower) -> `save_twotower` (bf16, per-expert layout) + tokenizer.json + MODEL.md. Every stage is resumable:
rerunning the same command with the same --run-dir continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch


def _log_fn(path: Path):
    def log(msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, flush=True)
        with open(path, "a") as f:
            f.write(line + "\n")

    return log


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m twotower.towers.train.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--run-dir", default=None, help="resumable state (default: a temp dir named after --out)")
    p.add_argument("--minutes-ar", type=float, default=60.0)
    p.add_argument("--minutes-denoiser", type=float, default=60.0)
    p.add_argument("--steps-ar", type=int, default=None, help="fixed step count (overrides --minutes-ar)")
    p.add_argument("--steps-denoiser", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-ar", type=int, default=8)
    p.add_argument("--lr-ar", type=float, default=2e-3)
    p.add_argument("--batch-denoiser", type=int, default=4)
    p.add_argument("--lr-denoiser", type=float, default=1e-3)
    p.add_argument("--block", type=int, default=16)
    p.add_argument("--distill-fraction", type=float, default=0.7)
    p.add_argument("--distill-count", type=int, default=8192)
    p.add_argument("--no-complementary", action="store_true")
    p.add_argument("--mock-ar-weight", type=float, default=1.0, help="weight of the denoiser's mock-AR KL term")
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--t-power", type=float, default=1.0,
                   help="denoiser training t = t_min + (1 - t_min) u^(1/p); p > 1 leans to fully masked blocks")
    p.add_argument("--init-from", default=None,
                   help="fine-tune: take the tokenizer and both towers from this checkpoint directory, skip AR "
                        "training and continue the denoiser from its weights (MODEL.md is left to the caller)")
    p.add_argument("--max-files", type=int, default=None, help="smoke runs: use only the first N files")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    os.environ.setdefault("RAYON_NUM_THREADS", str(a.threads))
    from ..checkpoint import load_tower, save_twotower
    from ..context import ContextTower
    from . import tokenizer as T
    from .ar import ARConfig, eval_ar, train_ar
    from .common import OptimConfig, bundled_config, count_params, init_for_training_, seed_all
    from .corpus import Corpus, token_stream
    from .denoiser import DenoiserConfig, denoiser_from_context, train_denoiser

    out = Path(a.out)
    run_dir = Path(a.run_dir) if a.run_dir else Path(tempfile.gettempdir()) / f"twotower-train-{out.name}"
    run_dir.mkdir(parents=True, exist_ok=True)
    log = _log_fn(run_dir / "log.txt")
    command = "python -m twotower.towers.train.run " + shlex.join(sys.argv[1:] if argv is None else argv)
    log(f"command: {command}")
    t_all = time.perf_counter()
    seed_all(a.seed)
    wall: dict[str, float] = {}

    # ---- corpus and tokenizer ----
    t0 = time.perf_counter()
    corpus = Corpus.load()
    if a.max_files:
        corpus.files, corpus.texts = corpus.files[: a.max_files], corpus.texts[: a.max_files]
    train_idx, held_idx = corpus.split()
    if not held_idx:  # tiny smoke subsets
        held_idx, train_idx = train_idx[-1:], train_idx[:-1]
    digest = corpus.sha256
    log(f"corpus {corpus.root}: {len(corpus.files)} files ({len(train_idx)} train / {len(held_idx)} held out), "
        f"{corpus.num_bytes() / 1e6:.1f} MB, sha256 {digest}")  # fmt: skip
    tok_path = run_dir / "tokenizer.json"
    if a.init_from and not tok_path.is_file():
        T.save(T.load(Path(a.init_from) / "tokenizer.json"), run_dir)
    if tok_path.is_file():
        tok = T.load(tok_path)
    else:
        tok = T.train_bpe([corpus.texts[i] for i in train_idx], a.vocab)
        T.save(tok, run_dir)
    streams_path = run_dir / "tokens.pt"
    if streams_path.is_file():
        streams = torch.load(streams_path, weights_only=True)
    else:
        enc = lambda texts: T.encode_batch(tok, texts)
        streams = {
            "train": token_stream(enc, [corpus.texts[i] for i in train_idx], T.EOS_ID),
            "heldout": token_stream(enc, [corpus.texts[i] for i in held_idx], T.EOS_ID),
            "corpus_sha256": digest,
        }
        torch.save(streams, streams_path)
    if streams["corpus_sha256"] != digest:
        raise SystemExit(f"{streams_path} was made from another corpus; use a fresh --run-dir")
    train, heldout = streams["train"], streams["heldout"]
    wall["corpus_and_tokenizer_s"] = time.perf_counter() - t0
    log(f"tokens: train {train.numel():,}, held out {heldout.numel():,} (vocab {tok.get_vocab_size()})")

    # ---- AR context tower ----
    arc = ARConfig(seq_len=a.seq_len, batch=a.batch_ar, steps=a.steps_ar, minutes=a.minutes_ar,
                   eval_every=a.eval_every, seed=a.seed, optim=OptimConfig(lr=a.lr_ar))  # fmt: skip
    if a.init_from:  # fine-tune: the context tower stays exactly the source's (bf16 values in float32)
        ctx = load_tower(a.init_from, "context", dtype=torch.float32)
        cfg = ctx.cfg
        heldout_ar = eval_ar(ctx, heldout, a.seq_len, a.batch_ar * 4, arc.eval_windows)
        ar_sum = {"minutes": 0.0, "steps": 0, "tokens": 0, "heldout_loss": heldout_ar, "history": [],
                  "init_from": str(a.init_from)}  # fmt: skip
        log(f"context tower from {a.init_from}: held-out loss {heldout_ar:.4f}")
    else:
        cfg = bundled_config(tok.get_vocab_size())
        ctx = init_for_training_(ContextTower(cfg), seed=a.seed)
        log(f"context tower: pattern {cfg.pattern}, hidden {cfg.hidden_size}, {count_params(ctx):,} params")
        ar_sum = train_ar(ctx, train, heldout, run_dir, arc, log)
    wall["ar_min"] = ar_sum["minutes"]

    # ---- denoiser ----
    if a.init_from:
        den = load_tower(a.init_from, "denoiser", dtype=torch.float32)
        log(f"denoiser from {a.init_from}: {count_params(den):,} params")
    else:
        den = denoiser_from_context(ctx, seed=a.seed)
    dc = DenoiserConfig(block=a.block, nblocks=a.seq_len // a.block, batch=a.batch_denoiser,
                        complementary=not a.no_complementary, distill_fraction=a.distill_fraction,
                        distill_count=a.distill_count, mock_ar_weight=a.mock_ar_weight,
                        steps=a.steps_denoiser, minutes=a.minutes_denoiser, t_power=a.t_power,
                        eval_every=a.eval_every, seed=a.seed,
                        optim=OptimConfig(lr=a.lr_denoiser, warmup_steps=50))  # fmt: skip
    den_sum = train_denoiser(den, ctx, train, heldout, run_dir, dc, log)
    wall["denoiser_min"] = den_sum["minutes"]

    # ---- checkpoint ----
    save_twotower(out, ctx, den, dtype=torch.bfloat16, overwrite=True)
    T.save(tok, out)
    size_mb = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 1e6
    log(f"saved {out} ({size_mb:.1f} MB of safetensors)")

    # ---- checks on the stored (bf16) model ----
    report: dict = {}
    try:
        ctx16 = load_tower(out, "context", dtype=torch.float32).eval()
        den16 = load_tower(out, "denoiser", dtype=torch.float32).eval()
        report["heldout_ar_loss_bf16"] = eval_ar(ctx16, heldout, a.seq_len, a.batch_ar * 4, arc.eval_windows)
        from .denoiser import eval_denoiser
        from .evaluate import decoding_report

        report["heldout_masked_nll_bf16"] = eval_denoiser(den16, ctx16, heldout, dc)
        g = torch.Generator().manual_seed(99)
        from .corpus import random_windows

        prompts = random_windows(heldout, 16, 32, g)
        report["decoding"] = decoding_report(ctx16, den16, prompts, max_new=64, block=a.block)
        sample_ids = T.encode_batch(tok, ["def parse_args("])[0]
        from .denoiser import greedy_continuations
        from .evaluate import diffusion_generate

        pr = torch.tensor([sample_ids])
        report["sample_ar"] = tok.decode(greedy_continuations(ctx16, pr, 48)[0, len(sample_ids) :].tolist())
        gen, fw = diffusion_generate(ctx16, den16, pr, 48, a.block, 0.8)
        report["sample_diffusion"] = tok.decode(gen[0].tolist())
        report["sample_diffusion_tpf"] = gen.numel() / max(fw, 1)
        from .evaluate import mock_ar_generate

        report["sample_mock_ar"] = tok.decode(mock_ar_generate(ctx16, den16, pr, 48)[0].tolist())
        log(f"checks: {json.dumps({k: v for k, v in report.items() if not k.startswith('sample')})}")
    except Exception as e:  # the checkpoint is written; a failed check must not lose it
        log(f"post-training checks failed: {type(e).__name__}: {e}")
        report["error"] = f"{type(e).__name__}: {e}"
    wall["total_min"] = (time.perf_counter() - t_all) / 60

    den_params = count_params(den)
    info = {
        "command": command, "seed": a.seed, "threads": a.threads, "python": platform.python_version(),
        "torch": torch.__version__, "corpus_root": str(corpus.root), "corpus_sha256": digest,
        "files": len(corpus.files), "train_files": len(train_idx), "heldout_files": len(held_idx),
        "corpus_bytes": corpus.num_bytes(), "train_tokens": train.numel(), "heldout_tokens": heldout.numel(),
        "vocab": tok.get_vocab_size(), "context_params": count_params(ctx), "denoiser_params": den_params,
        "safetensors_mb": size_mb, "ar": {k: v for k, v in ar_sum.items() if k != "history"},
        "ar_config": {"seq_len": arc.seq_len, "batch": arc.batch, "lr": arc.optim.lr, "schedule": "WSD"},
        "denoiser": {k: v for k, v in den_sum.items() if k != "history"},
        "denoiser_config": {"block": dc.block, "blocks_per_window": dc.nblocks, "batch": dc.batch,
                            "complementary": dc.complementary, "t_min": dc.t_min, "t_power": dc.t_power,
                            "distill_fraction": dc.distill_fraction, "distill_count": dc.distill_count,
                            "distill_prefix": dc.distill_prefix, "distill_blocks": dc.distill_blocks,
                            "mock_ar_weight": dc.mock_ar_weight, "lr": dc.optim.lr},
        "wall": wall, "checks": report, "ar_history": ar_sum["history"], "denoiser_history": den_sum["history"],
    }  # fmt: skip
    (run_dir / "summary.json").write_text(json.dumps(info, indent=2) + "\n")
    if not a.init_from:
        (out / "MODEL.md").write_text(model_card(info, cfg))
    log(f"done in {wall['total_min']:.1f} min" + ("" if a.init_from else "; MODEL.md written"))
    return 0


def _fmt(v, nd=4):
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def model_card(i: dict, cfg) -> str:
    ar, den, ck = i["ar"], i["denoiser"], i["checks"]
    lines = [
        "# twotower-tiny",
        "",
        "A small two-tower block-diffusion model trained on CPU by this repository's own pipeline",
        "(`twotower/towers/train/`), bundled as the default model of `twotower generate`. It exercises every "
        "layer kind of NemotronH TwoTower (Mamba-2, attention, MoE) and the full denoiser conditioning; it is a test",
        "fixture with plausible Python output, not a useful code model.",
        "",
        "## Reproduce",
        "",
        "```",
        i["command"],
        "```",
        "",
        f"seed {i['seed']}, {i['threads']} torch thread(s), Python {i['python']}, torch {i['torch']}. "
        "Bit-exact reproduction needs the same stdlib (checked by the corpus hash) and the same torch build;",
        "the AR and denoiser step counts were fixed from the wall-clock budget after timing the first steps",
        "(recorded below; pass them as --steps-ar / --steps-denoiser to repeat the exact schedule).",
        "",
        "## Data",
        "",
        f"- Corpus: CPython standard library source at `{i['corpus_root']}` (rules in "
        "`twotower/towers/train/corpus.py`:",
        "  all `*.py` incl. `test/`, excluding site-packages, __pycache__, encodings, pydoc_data, config-*,",
        "  files > 256 KB and non-UTF-8 files).",
        f"- Files: {i['files']} ({i['train_files']} train / {i['heldout_files']} held out, whole files by path hash),"
        f" {i['corpus_bytes'] / 1e6:.1f} MB.",
        f"- Corpus sha256 (over relative path + content, in order): `{i['corpus_sha256']}`",
        f"- Tokens: {i['train_tokens']:,} train, {i['heldout_tokens']:,} held out; each file ends with `</s>`.",
        f"- Tokenizer: byte-level BPE, vocab {i['vocab']}, trained on the train files; `<pad>`=0 `<s>`=1 `</s>`=2"
        " `<mask>`=3.",
        "",
        "## Model",
        "",
        f"- One NemotronH config for both towers: pattern `{cfg.pattern}`, hidden {cfg.hidden_size}, attention "
        f"{cfg.num_attention_heads}q/{cfg.num_key_value_heads}kv x {cfg.head_dim}, Mamba {cfg.mamba_num_heads} heads "
        f"x {cfg.mamba_head_dim}, state {cfg.ssm_state_size}, MoE {cfg.n_routed_experts} experts top-"
        f"{cfg.num_experts_per_tok} (inter {cfg.moe_intermediate_size}) + shared expert "
        f"({cfg.moe_shared_expert_intermediate_size}).",
        f"- Parameters: context tower {i['context_params']:,}, denoiser {i['denoiser_params']:,} (incl. adaLN); "
        f"stored bf16 (router fp32), per-expert layout: {i['safetensors_mb']:.1f} MB.",
        "",
        "## Training",
        "",
        f"- AR context tower: next-token CE, {ar['steps']} steps x {i['ar_config']['batch']} x "
        f"{i['ar_config']['seq_len']} tokens = {ar['tokens']:,} tokens, AdamW lr {i['ar_config']['lr']} "
        f"(WSD: warmup 50, decay over the last 25%), clip 1.0, wd 0.1, aux-free MoE balancing; "
        f"{ar['minutes']:.1f} min.",
        f"- Denoiser: initialised from the context tower (adaLN identity), context tower frozen; blocks of "
        f"{i['denoiser_config']['block']}, t ~ U[{i['denoiser_config']['t_min']}, 1] per block, loss = mean NLL over"
        " masked positions (no 1/t weight, TwoTower's choice), complementary masking "
        f"{'on' if i['denoiser_config']['complementary'] else 'off'}, "
        f"{i['denoiser_config']['distill_fraction']:.0%} of steps on the AR tower's greedy continuations "
        f"({i['denoiser_config']['distill_count']} x {i['denoiser_config']['distill_prefix']}-token corpus prefix + "
        f"{i['denoiser_config']['distill_blocks']} blocks), plus {i['denoiser_config']['mock_ar_weight']} x the "
        "mock-AR term (KL from the context tower's next-token distribution to the unmodulated denoiser's at "
        f"every block start); {den['steps']} steps, {den['block_tokens']:,} block "
        f"tokens, lr {i['denoiser_config']['lr']}; {den['minutes']:.1f} min.",
        f"- Wall time: {i['wall']['total_min']:.1f} min in all.",
        "",
        "## Results (held out files)",
        "",
        f"- AR loss {_fmt(ar['heldout_loss'])} nats/token (ppl {math.exp(ar['heldout_loss']):.1f}); from the stored "
        f"bf16 weights {_fmt(ck.get('heldout_ar_loss_bf16', 'n/a'))}.",
        f"- Denoiser masked NLL {_fmt(den['heldout_masked_nll'])} (fixed noise draw); bf16 "
        f"{_fmt(ck.get('heldout_masked_nll_bf16', 'n/a'))}.",
    ]
    mk = den.get("heldout_mock_ar")
    if mk:
        lines.append(f"- Mock-AR at block starts: next-token NLL {mk['nll_denoiser']:.4f} (context tower on the same "
                     f"tokens {mk['nll_context']:.4f}), KL(context || mock-AR) {mk['kl']:.4f}.")  # fmt: skip
    dec = ck.get("decoding")
    if dec:
        lines += [
            "",
            "Greedy mask diffusion (`twotower/towers/train/evaluate.py`, the reference loop) on "
            f"{dec['prompts']} held-out "
            f"{dec['prompt_len']}-token prompts, {dec['max_new']} new tokens, block {dec['block']}:",
            "",
            "| gamma | tokens / denoiser forward | token match with AR greedy | first divergence (mean) |",
            "|---|---|---|---|",
        ]
        for g, r in dec["by_gamma"].items():
            lines.append(f"| {g} | {r['tokens_per_denoiser_forward']:.2f} | {r['ar_token_match']:.2f} | "
                         f"{r['ar_first_divergence_mean']:.1f} |")  # fmt: skip
        if "mock_ar" in dec:
            r = dec["mock_ar"]
            lines.append(f"| mock-AR | 1.00 | {r['ar_token_match']:.2f} | {r['ar_first_divergence_mean']:.1f} |")
    if "sample_ar" in ck:
        lines += ["", "Samples for the prompt `def parse_args(` (48 tokens, greedy):", "", "AR:", "", "```",
                  "def parse_args(" + ck["sample_ar"], "```", "",
                  f"Diffusion, gamma 0.8 ({ck['sample_diffusion_tpf']:.2f} tokens / denoiser forward):", "", "```",
                  "def parse_args(" + ck["sample_diffusion"], "```"]  # fmt: skip
    if "sample_mock_ar" in ck:
        lines += ["", "Mock-AR:", "", "```", "def parse_args(" + ck["sample_mock_ar"], "```"]
    lines += ["", "## Loss curves", "", "| AR step | train | held out | min |", "|---|---|---|---|"]
    for h in i["ar_history"]:
        lines.append(f"| {h['step']} | {h['train_loss']:.3f} | {h['heldout_loss']:.3f} | {h['minutes']:.1f} |")
    lines += ["", "| denoiser step | train real | train distill | train mock-AR KL | held-out masked NLL | "
              "held-out mock-AR KL | min |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for h in i["denoiser_history"]:
        mk = h.get("heldout_mock_ar") or {}
        lines.append(f"| {h['step']} | {_fmt(h['train_real'], 3)} | {_fmt(h['train_distill'], 3)} | "
                     f"{_fmt(h.get('train_mock_ar_kl'), 3)} | {h['heldout_masked_nll']:.3f} | "
                     f"{_fmt(mk.get('kl'), 3)} | {h['minutes']:.1f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
