"""Kernel check: our Triton kernels against their PyTorch references (and mamba-ssm where it imports).

    python benchmarks/kernel_check.py [--device cuda] [--budget-s 90]

For a mid-size Mamba-2 config (h 64, p 64, n 128, g 8; x/B/C/xBC in bf16, dt and states float32):
  * ssd_block_scan (seeded block of l in {1, 16}, b in {1, 8}): reference, Triton, Triton through a
    shuffled slot pool in place, and mamba-ssm's mamba_chunk_scan_combined with initial_states
    (chunk 128, so l < chunk: the case it is reported to get wrong);
  * one decode step (b in {1, 8}): reference, the fused Triton kernel, the mixer's current unfused path
    (kernels.causal_conv1d_update + silu + kernels.ssd_step), mamba-ssm's selective_state_update (SSM
    update only, no conv).
Prints a markdown table: time per call (CUDA events, median of 3 rounds) and max |error| against the
reference of y and of the final state. Without CUDA it says so and times only the references at a tiny
size (exit 0). `run()` is also called from benchmarks/gpu_check.py.
"""

from __future__ import annotations

import argparse
import importlib
import math
import statistics
import time

import torch
import torch.nn.functional as F

from twotower import kernels
from twotower.kernels import mamba_decode_step_ref, ssd_block_scan_ref

MID = dict(h=64, p=64, n=128, g=8, k=4, batches=(1, 8), lengths=(1, 16))
TINY = dict(h=4, p=8, n=16, g=2, k=4, batches=(1, 2), lengths=(1, 4))


def _sync(dev: str) -> None:
    if dev.startswith("cuda"):
        torch.cuda.synchronize()


def _time_ms(fn, dev: str, iters: int) -> float:
    """Median over 3 rounds of the mean time of `iters` calls, after 3 warm-up calls (compiles)."""
    for _ in range(3):
        fn()
    _sync(dev)
    rounds = []
    for _ in range(3):
        if dev.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            torch.cuda.synchronize()
            rounds.append(start.elapsed_time(end) / iters)
        else:
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            rounds.append((time.perf_counter() - t0) * 1e3 / iters)
    return statistics.median(rounds)


def _err(a, b) -> float:
    return float((a.float() - b.float()).abs().max()) if a is not None and b is not None else float("nan")


def _optional(name: str):
    try:
        return importlib.import_module(name)
    except Exception:  # not installed, or a CUDA extension that fails to load
        return None


def _block_inputs(b, l, h, p, n, g, dev, dtype, gen):
    x = torch.randn(b, l, h, p, generator=gen).to(dev, dtype)
    dt = torch.exp(torch.empty(b, l, h).uniform_(math.log(1e-3), math.log(0.1), generator=gen)).to(dev)
    A = -torch.empty(h).uniform_(1.0, 16.0, generator=gen).to(dev)
    B = (torch.randn(b, l, g, n, generator=gen) / math.sqrt(n)).to(dev, dtype)
    C = (torch.randn(b, l, g, n, generator=gen) / math.sqrt(n)).to(dev, dtype)
    D = (1.0 + 0.1 * torch.randn(h, generator=gen)).to(dev)
    s0 = torch.randn(b, h, p, n, generator=gen).to(dev)
    return x, dt, A, B, C, D, s0


def _check_block_scan(rows, cfg, b, l, dev, dtype, gen, iters, fast, mamba_ok):
    h, p, n, g = cfg["h"], cfg["p"], cfg["n"], cfg["g"]
    x, dt, A, B, C, D, s0 = _block_inputs(b, l, h, p, n, g, dev, dtype, gen)
    y_ref, f_ref = ssd_block_scan_ref(x, dt, A, B, C, D, s0)
    base = dict(op="ssd_block_scan", b=b, l=l)
    rows.append(dict(base, impl="reference", ms=_time_ms(lambda: ssd_block_scan_ref(x, dt, A, B, C, D, s0), dev,
                                                          iters), err_y=0.0, err_state=0.0, note=""))  # fmt: skip
    if fast is not None:
        tk = fast["triton_ssd"]
        y, f = tk.ssd_block_scan(x, dt, A, B, C, D, s0)
        rows.append(dict(base, impl="triton", ms=_time_ms(lambda: tk.ssd_block_scan(x, dt, A, B, C, D, s0), dev, iters),
                         err_y=_err(y, y_ref), err_state=_err(f, f_ref), note=""))  # fmt: skip
        slots = torch.randperm(2 * b, generator=gen)[:b].to(dev)
        pool = torch.randn(2 * b, h, p, n, generator=gen).to(dev)
        pool[slots] = s0
        y, _ = tk.ssd_block_scan(x, dt, A, B, C, D, pool, state_slots=slots, out_state=pool)
        err_state = _err(pool[slots], f_ref)
        ms = _time_ms(lambda: tk.ssd_block_scan(x, dt, A, B, C, D, pool, state_slots=slots, out_state=pool), dev,
                      iters)  # fmt: skip
        rows.append(dict(base, impl="triton slot pool, in place", ms=ms, err_y=_err(y, y_ref), err_state=err_state,
                         note=f"pool of {2 * b} slots"))  # fmt: skip
    mod = _optional("mamba_ssm.ops.triton.ssd_combined") if mamba_ok() else None
    if mod is not None:
        call = lambda: mod.mamba_chunk_scan_combined(x, dt, A, B, C, 128, D=D, initial_states=s0,
                                                     return_final_states=True)  # fmt: skip
        try:
            y, f = call()
            rows.append(dict(base, impl="mamba_ssm chunk_scan_combined", ms=_time_ms(call, dev, iters),
                             err_y=_err(y, y_ref), err_state=_err(f, f_ref), note="chunk 128"))  # fmt: skip
        except Exception as e:  # an unsupported shape in that version: report, do not fail the check
            rows.append(dict(base, impl="mamba_ssm chunk_scan_combined", ms=float("nan"), err_y=float("nan"),
                             err_state=float("nan"), note=f"failed: {type(e).__name__}: {str(e)[:60]}"))  # fmt: skip


def _check_decode_step(rows, cfg, b, dev, dtype, gen, iters, fast, mamba_ok):
    h, p, n, g, k = cfg["h"], cfg["p"], cfg["n"], cfg["g"], cfg["k"]
    conv_dim = h * p + 2 * g * n
    xBC = torch.randn(b, conv_dim, generator=gen).to(dev, dtype)
    conv0 = torch.randn(b, conv_dim, k, generator=gen).to(dev, dtype)
    weight = (torch.randn(conv_dim, k, generator=gen) / math.sqrt(k)).to(dev, dtype)
    bias = (0.1 * torch.randn(conv_dim, generator=gen)).to(dev, dtype)
    dt = torch.exp(torch.empty(b, h).uniform_(math.log(1e-3), math.log(0.1), generator=gen)).to(dev)
    A = -torch.empty(h).uniform_(1.0, 16.0, generator=gen).to(dev)
    D = (1.0 + 0.1 * torch.randn(h, generator=gen)).to(dev)
    ssm0 = torch.randn(b, h, p, n, generator=gen).to(dev)
    conv_ref, ssm_ref = conv0.clone(), ssm0.clone()
    y_ref = mamba_decode_step_ref(xBC, conv_ref, weight, bias, dt, A, D, ssm_ref)
    base = dict(op="mamba_decode_step", b=b, l=1)
    conv, ssm = conv0.clone(), ssm0.clone()  # timed calls keep updating these (bounded: decay <= 1)
    ms = _time_ms(lambda: mamba_decode_step_ref(xBC, conv, weight, bias, dt, A, D, ssm), dev, iters)
    rows.append(dict(base, impl="reference", ms=ms, err_y=0.0, err_state=0.0, note=""))

    def unfused(conv_state, ssm_state):  # the mixer's decode branch today (ssd_step may update ssm_state in place)
        conv_out, _ = kernels.causal_conv1d_update(xBC, conv_state, weight, bias)
        xs, Bs, Cs = torch.split(F.silu(conv_out), [h * p, g * n, g * n], dim=-1)
        return kernels.ssd_step(ssm_state, xs.view(b, h, p), dt, A, Bs.view(b, g, n), Cs.view(b, g, n), D)

    y, s = unfused(conv0.clone(), ssm0.clone())
    conv, ssm = conv0.clone(), ssm0.clone()
    rows.append(dict(base, impl="unfused (mixer today)", ms=_time_ms(lambda: unfused(conv, ssm), dev, iters),
                     err_y=_err(y, y_ref), err_state=_err(s, ssm_ref), note="conv output rounded to bf16"))  # fmt: skip
    if fast is not None:
        tk = fast["triton_mamba_step"]
        conv, ssm = conv0.clone(), ssm0.clone()
        y = tk.mamba_decode_step(xBC, conv, weight, bias, dt, A, D, ssm)
        err = dict(err_y=_err(y, y_ref), err_state=max(_err(ssm, ssm_ref), _err(conv, conv_ref)))
        ms = _time_ms(lambda: tk.mamba_decode_step(xBC, conv, weight, bias, dt, A, D, ssm), dev, iters)
        rows.append(dict(base, impl="triton fused", ms=ms, **err, note="conv + silu + SSM, in place"))
    mod = _optional("mamba_ssm.ops.triton.selective_state_update") if mamba_ok() else None
    if mod is not None:
        conv_out, _ = kernels.causal_conv1d_update_ref(xBC.float(), conv0.float(), weight.float(), bias.float())
        xs, Bs, Cs = torch.split(F.silu(conv_out), [h * p, g * n, g * n], dim=-1)
        xs, Bs, Cs = xs.reshape(b, h, p), Bs.reshape(b, g, n), Cs.reshape(b, g, n)
        dt_e, A_e, D_e = dt[..., None].expand(-1, -1, p), A[:, None, None].expand(-1, p, n), D[:, None].expand(-1, p)
        ssm = ssm0.clone()
        call = lambda: mod.selective_state_update(ssm, xs, dt_e, A_e, Bs, Cs, D=D_e)
        try:
            y = call()
            err = dict(err_y=_err(y, y_ref), err_state=_err(ssm, ssm_ref))
            rows.append(dict(base, impl="mamba_ssm selective_state_update", ms=_time_ms(call, dev, iters), **err,
                             note="SSM update only (no conv)"))  # fmt: skip
        except Exception as e:
            rows.append(dict(base, impl="mamba_ssm selective_state_update", ms=float("nan"), err_y=float("nan"),
                             err_state=float("nan"), note=f"failed: {type(e).__name__}: {str(e)[:60]}"))  # fmt: skip


def run(device: str = "cuda", log=print, budget_s: float = 90.0) -> list[dict]:
    """Times and checks the kernels; returns one dict per (op, impl, b, l) row and logs the table.

    On a machine without CUDA (or with device="cpu") only the references run, at a tiny size. Past
    `budget_s` seconds the optional mamba-ssm comparisons (whose autotuning compiles dominate) are skipped."""
    t_start = time.perf_counter()
    if device.startswith("cuda") and not torch.cuda.is_available():
        log("kernel_check: CUDA is not available: timing only the references, at a tiny size, on CPU")
        device = "cpu"
    on_cuda = device.startswith("cuda")
    cfg, iters = (MID, 20) if on_cuda else (TINY, 3)
    fast = None
    if on_cuda and _optional("triton") is not None:
        fast = {m: importlib.import_module(f"twotower.kernels.{m}") for m in ("triton_ssd", "triton_mamba_step")}
    elif on_cuda:
        log("kernel_check: triton does not import: references only")

    def mamba_ok() -> bool:
        if not on_cuda:
            return False
        if time.perf_counter() - t_start > budget_s:
            log(f"kernel_check: past {budget_s:.0f} s, skipping the remaining mamba-ssm comparisons")
            return False
        return True

    gen = torch.Generator().manual_seed(0)
    rows: list[dict] = []
    for b in cfg["batches"]:
        for l in cfg["lengths"]:
            _check_block_scan(rows, cfg, b, l, device, torch.bfloat16, gen, iters, fast, mamba_ok)
        _check_decode_step(rows, cfg, b, device, torch.bfloat16, gen, iters, fast, mamba_ok)
    _sync(device)
    shape = ", ".join(f"{k} {cfg[k]}" for k in ("h", "p", "n", "g", "k"))
    log(f"\nkernel_check on {torch.cuda.get_device_name() if on_cuda else 'cpu'} ({shape}; x/B/C/xBC bf16, "
        f"states float32), {time.perf_counter() - t_start:.1f} s\n")  # fmt: skip
    log(markdown(rows))
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| op | impl | b | l | ms | max abs err y | max abs err state | note |", "|" + " --- |" * 8]
    for r in rows:
        lines.append(f"| {r['op']} | {r['impl']} | {r['b']} | {r['l']} | {r['ms']:.4f} | {r['err_y']:.2e} | "
                     f"{r['err_state']:.2e} | {r['note']} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--budget-s", type=float, default=90.0, help="skip mamba-ssm comparisons after this long")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        torch.set_num_threads(1)  # the CPU fallback runs on shared 2-core machines
    run(args.device, budget_s=args.budget_s)


if __name__ == "__main__":
    main()
