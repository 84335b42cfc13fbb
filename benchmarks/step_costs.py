"""Per-step costs of the in-process executor (used by bench_decode --compile and gpu_check): wall
milliseconds of each tower step kind at a given batch, and the aten ops one call dispatches; plus the
transformers `nemotron_h` generate baseline for the same context tower.

Every figure is a median over repeated calls on one lane of fresh sequences, after the step's graph
has been compiled (first call) and warmed (second call)."""

from __future__ import annotations

import statistics
import tempfile
import time

import torch

from twotower.cluster.engine.executor import InProcessExecutor

BLOCK = 16
PROMPT = list(range(5, 45))  # 40 tokens: one prefill chunk


def aten_ops_per_call(fn) -> int:
    """Top-level aten ops one call dispatches (ops called from inside another op are not counted)."""
    from torch.profiler import profile

    fn()
    with torch.no_grad(), profile() as prof:
        fn()
    return sum(1 for e in prof.events() if e.name.startswith("aten::") and
               (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))  # fmt: skip


def _median_ms(fn, reps: int, sync=lambda: None) -> float:
    fn()
    fn()
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def step_calls(ex: InProcessExecutor, lane: str, batch: int, mask_id: int) -> dict:
    """One zero-argument callable per step kind over `lane` (batch rows, already prefilled). Verify is
    followed by a rewind to where it started; decode advances (a few dozen calls stay in one window)."""
    ids1 = torch.full((batch,), 7, dtype=torch.long)
    blk = torch.full((batch, BLOCK), 9, dtype=torch.long)
    full = torch.full((batch,), BLOCK, dtype=torch.long)
    t = torch.full((batch,), 0.5)
    temp = torch.zeros(batch)
    seeds = [0] * batch

    def decode():  # advances one token per call: 40 + a few dozen calls stay inside one window bucket
        ex.decode(lane, ids1, None)

    def verify():
        ex.verify(lane, blk, full).result()
        ex.rewind(lane, torch.zeros(batch, dtype=torch.long))

    out = {"decode": decode, "verify S16 (+rewind)": verify}
    if ex.den is not None:
        out["denoise S16"] = lambda: ex.denoise(lane, blk, t, mask_id, temp, seeds).result()
        out["mock_ar"] = lambda: ex.mock_ar(lane, ids1, _greedy(batch)).result()
    return out


def _greedy(batch: int):
    from twotower.decoding.sampler import RowSampling

    return RowSampling(temperature=[0.0] * batch, top_k=[0] * batch, top_p=[1.0] * batch, seeds=[0] * batch)


def step_table(executors: dict[str, InProcessExecutor], batches: list[int], mask_id: int, reps: int = 20,
               count_ops: bool = True):  # fmt: skip
    """{(kind, batch): {label: ms}} and {(kind, label): ops at the first batch} for each executor (on CUDA
    each timed call is synchronised)."""
    times: dict[tuple[str, int], dict[str, float]] = {}
    ops: dict[tuple[str, str], int] = {}
    for label, ex in executors.items():
        for b in batches:
            lane = f"steps{b}"
            ex.add_rows(lane, [PROMPT] * b, None)
            sync = torch.cuda.synchronize if ex.ctx.device.type == "cuda" else (lambda: None)
            for kind, fn in step_calls(ex, lane, b, mask_id).items():
                with torch.no_grad():
                    times.setdefault((kind, b), {})[label] = _median_ms(fn, reps, sync)
                if count_ops and b == batches[0]:
                    ops[(kind, label)] = aten_ops_per_call(fn)
            ex.close_lane(lane)
    return times, ops


def decode_rate(generate, n: int, reps: int = 3) -> float:
    """Tokens/s of decoding alone: (n - 1) / (t(n) - t(1)), t(k) = best of `reps` runs of generate(k)
    (a request of k new tokens, prompt included), so prefill and request overhead cancel."""
    def best(k: int) -> float:
        out = []
        for _ in range(reps):
            t0 = time.perf_counter()
            generate(k)
            out.append(time.perf_counter() - t0)
        return min(out)

    generate(2)
    return (n - 1) / (best(n) - best(1))


def hf_model(context_tower):
    """transformers' NemotronHForCausalLM on the same weights (float32), or None without transformers."""
    try:
        from transformers import NemotronHForCausalLM
    except ImportError:
        return None
    from twotower.towers.checkpoint.writer import save_nemotron_h

    with tempfile.TemporaryDirectory() as d:
        save_nemotron_h(d, context_tower, dtype=torch.float32)
        return NemotronHForCausalLM.from_pretrained(d, dtype=torch.float32).eval()


@torch.no_grad()
def hf_generate(hf, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy generate of exactly max_tokens new tokens."""
    ids = torch.tensor([prompt])
    out = hf.generate(ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
    return out[0, ids.shape[1] :].tolist()
