"""Static-shape tower steps (engine/steps.py, runners over twotower/towers/pool.py).

- Compiled steps give the eager steps' tokens in every mode, under joins and finishes mid-block and over
  lengths that grow past several window buckets, and each (step, bucket) compiles exactly once: zero
  recompiles and zero graph breaks, read from TorchDynamo's counters over a 200+-step serving-like run.
  The default run captures with the "eager" backend (the same full graphs, traced in seconds); the slow
  test runs TorchInductor on the bundled model.
- Admission and finish write only their own slots: nothing else in the pool moves or changes.
"""

from __future__ import annotations

import random

import pytest
import torch
from torch._dynamo.eval_frame import _debug_get_cache_entry_list
from torch._dynamo.utils import counters

from twotower.cluster.engine.engine import Engine
from twotower.cluster.engine.executor import InProcessExecutor, PoolLimits
from twotower.cluster.engine.params import ModelLimits
from twotower.cluster.engine.params import SamplingParams as P
from twotower.cluster.engine.steps import batch_bucket, window_bucket
from twotower.towers.config import preset
from twotower.towers.context import ContextTower
from twotower.towers.denoiser import DenoiserTower
from twotower.towers.init import init_random_

CFG = preset("tiny").replace(vocab_size=260)  # every layer kind: M * E -
POOL = PoolLimits(slots=4, max_model_len=200, max_block_size=8, min_window=16)
LIMITS = ModelLimits(260, 200, 8)


def test_buckets():
    assert [batch_bucket(n, 32) for n in (1, 2, 3, 5, 9, 17, 32)] == [1, 2, 4, 8, 16, 32, 32]
    assert batch_bucket(5, 6) == 6  # the largest bucket is max_num_seqs itself
    with pytest.raises(ValueError, match="max_num_seqs"):
        batch_bucket(7, 6)
    assert [window_bucket(n, 1000, 16) for n in (0, 16, 17, 100, 600, 999)] == [16, 16, 32, 128, 1000, 1000]


@pytest.fixture(scope="module")
def towers():
    return init_random_(ContextTower(CFG), seed=0), init_random_(DenoiserTower(CFG), seed=1)


def serving_run(towers, compile) -> tuple[list[list[int]], int, InProcessExecutor]:
    """Requests of every mode join at different steps and finish at different points of their blocks;
    prompt lengths 3..60 and up to 130 new tokens, so windows cross 16, 32, 64 and 128."""
    ex = InProcessExecutor(*towers, POOL, compile=compile)
    eng = Engine(ex, LIMITS, max_num_seqs=POOL.slots)
    rng = random.Random(0)
    plan = [(0, "ar", 35, 130), (0, "diffusion", 5, 21), (3, "lossless", 12, 29), (6, "mock_ar", 3, 17),
            (20, "diffusion", 60, 37), (40, "lossless", 7, 19), (60, "ar", 20, 23), (90, "mock_ar", 30, 40),
            (130, "diffusion", 9, 75), (150, "lossless", 40, 60)]  # fmt: skip
    reqs, steps = [], 0
    while steps < 1000 and (plan or eng.has_unfinished()):
        while plan and plan[0][0] <= steps:
            _, mode, n_prompt, n_new = plan.pop(0)
            prompt = [rng.randrange(4, 260) for _ in range(n_prompt)]
            reqs.append(eng.add_request(prompt, P(mode=mode, max_tokens=n_new, block_size=rng.choice([4, 8]),
                                                  steps_per_block=4, gamma=0.5, ignore_eos=True)))  # fmt: skip
        eng.step()
        steps += 1
    assert all(r.finished for r in reqs)
    return [r.output_ids for r in reqs], steps, ex


def test_compiled_steps_equal_eager_and_compile_once(towers):
    want, steps, _ = serving_run(towers, compile=False)
    torch._dynamo.reset()
    counters.clear()
    got, steps_c, ex = serving_run(towers, compile="eager")
    assert steps_c == steps >= 200
    assert got == want
    graphs = {**ex.ctx.steps.graphs, **{("den", *k): g for k, g in ex.den.steps.graphs.items()}}
    kinds = {k[0] if k[0] != "den" else k[1] for k in graphs}
    assert kinds == {"extend", "decode", "verify", "rewind", "denoise", "mock_ar"}
    windows = {k[2] for k in ex.ctx.steps.graphs if k[0] != "rewind"}  # rewind keys: (kind, batch, block)
    assert {16, 32, 64, 128} <= windows, windows  # lengths grew past several buckets
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == len(graphs)  # one graph per key, no recompiles
    for key, g in graphs.items():
        assert len(_debug_get_cache_entry_list(g._torchdynamo_orig_callable.__code__)) == 1, key


def test_admission_and_finish_touch_only_their_slots(towers):
    ex = InProcessExecutor(*towers, POOL)
    ex.add_rows("L", [[5, 6, 7, 8, 9], [10, 11, 12]], None, True)
    ex.extend("L", torch.full((2, 4), 9), torch.tensor([4, 4]))
    pool = ex.ctx.pool
    first = ex.lane_slots["L"][0]
    ptrs = [t.data_ptr() for t in pool.tensors()]

    def snapshot():
        return [t[first].clone() for t in pool.tensors()]

    before = snapshot()
    ex.add_rows("M", [[13, 14, 15]], None)  # a join in another lane
    ex.add_rows("L", [[20, 21]], None)  # and in the same lane
    assert all(torch.equal(x, y) for x, y in zip(before, snapshot(), strict=True))
    second, third = ex.lane_slots["L"][1:]
    ex.keep_rows("L", [0, 2])  # row 1 finishes
    assert ex.lane_slots["L"] == [first, third] and second in ex.ctx.table.free
    assert all(torch.equal(x, y) for x, y in zip(before, snapshot(), strict=True))
    assert [t.data_ptr() for t in pool.tensors()] == ptrs  # nothing reallocated, nothing moved
    ex.close_lane("L")
    ex.close_lane("M")
    assert len(ex.ctx.table.free) == POOL.slots and not ex.lane_slots


def test_a_pool_too_small_for_the_request_is_refused_by_name(towers):
    ex = InProcessExecutor(*towers, PoolLimits(slots=2, max_model_len=16, max_block_size=4, min_window=16))
    with pytest.raises(ValueError, match="max_model_len"):
        ex.add_rows("L", [[5] * 200], None)  # 200 > the pool's 16 + 2 x 64 positions
    assert len(ex.ctx.table.free) == 2 and not ex.lane_slots  # refused before taking a slot


@pytest.mark.slow
def test_inductor_steps_equal_eager_on_the_bundled_model():
    """TorchInductor graphs (the CPU fast path) against eager, every mode, float32, greedy."""
    from twotower.cluster.engine.config import EngineConfig
    from twotower.cluster.engine.loading import build_engine, load_model

    model = load_model(None)
    prompts = ["def parse_args(", "import os\nimport sys\n", "class Config:\n    def __init__(self"]
    outs = {}
    for eager in (True, False):
        eng = build_engine(model, EngineConfig(max_num_seqs=4, max_model_len=512, eager=eager,
                                                    warmup=False))
        for mode in ("ar", "diffusion", "lossless", "mock_ar"):
            reqs = eng.generate(prompts, P(mode=mode, max_tokens=24, ignore_eos=True))
            outs[eager, mode] = [r.output_ids for r in reqs]
    for mode in ("ar", "diffusion", "lossless", "mock_ar"):
        assert outs[False, mode] == outs[True, mode], mode


def test_padding_rows_never_advance_the_scratch_slot(towers):
    """Padding rows write only the scratch slot; its length must stay 0, or a long-lived lane of 3 rows
    (bucket 4) would push the scratch row's writes past the pool's capacity."""
    ex = InProcessExecutor(*towers, POOL)
    ex.add_rows("L", [[5, 6], [7], [8, 9, 10]], None)
    pool = ex.ctx.pool
    for _ in range(3):
        ex.decode("L", torch.tensor([11, 12, 13]), None)
    ex.extend("L", torch.full((3, 4), 9), torch.tensor([4, 2, 0]))
    ex.verify("L", torch.full((3, 4), 9), torch.tensor([4, 4, 4]))
    ex.rewind("L", torch.tensor([1, 2, 3]))
    assert int(pool.lengths[pool.scratch]) == 0
    assert pool.lengths[ex.lane_slots["L"]].tolist() == [2 + 3 + 4 + 1, 1 + 3 + 2 + 2, 3 + 3 + 0 + 3]


def test_warm_up_builds_the_start_up_set_on_scratch_only(towers, capsys):
    """Warm-up compiles every batch bucket of every step kind at the block sizes asked, touching no real
    slot; a serving run inside that set then compiles nothing new."""
    limits = PoolLimits(slots=4, max_model_len=100, max_block_size=8, min_window=128)
    ex = InProcessExecutor(*towers, limits, compile="eager")
    ex.add_rows("live", [[5, 6, 7]], None)  # a sequence in flight must not be touched
    live = ex.lane_slots["live"][0]
    before = [t[live].clone() for t in ex.ctx.pool.tensors()]
    secs = ex.warm_up([4])
    keys = set(ex.ctx.steps.graphs) | set(ex.den.steps.graphs)
    B, W = (1, 2, 4), 128
    assert keys == {(k, b, W, *s) for b in B for k, s in [("decode", ()), ("extend", (64,)), ("extend", (4,)),
                    ("verify", (4,)), ("mock_ar", ()), ("denoise", (4,))]} | {("rewind", b, 4) for b in B}  # fmt: skip
    assert all(torch.equal(x, t[live]) for x, t in zip(before, ex.ctx.pool.tensors(), strict=True))
    assert int(ex.ctx.pool.lengths[ex.ctx.pool.scratch]) == 0 and secs > 0
    err = capsys.readouterr().err
    n = len(keys) - 1  # the live row's prefill already built ("extend", 1, 128, 64)
    assert "compiling tower steps" in err and f"{n}/{n}" in err
    eng = Engine(ex, LIMITS, max_num_seqs=limits.slots)
    for mode in ("ar", "diffusion", "lossless", "mock_ar"):
        eng.generate([[9, 10, 11], [12, 13]], P(mode=mode, max_tokens=9, block_size=4, ignore_eos=True))
    assert set(ex.ctx.steps.graphs) | set(ex.den.steps.graphs) == keys
    assert ex.warm_up([4]) == 0.0  # nothing left to build


@pytest.mark.cuda
def test_captured_steps_equal_eager_on_cuda(towers):
    """CUDA graphs over the compiled steps replay the eager steps' tokens (run by benchmarks/gpu_check.py)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    cuda = tuple(t.cuda() for t in towers)
    outs = {}
    for compile in (False, True):
        ex = InProcessExecutor(*cuda, POOL, compile=compile)
        assert ex.ctx.steps.capture == bool(compile)
        eng = Engine(ex, LIMITS, max_num_seqs=POOL.slots)
        outs[compile] = [[r.output_ids for r in eng.generate([[5, 6, 7], [8, 9]], P(mode=m, max_tokens=20,
                          block_size=4, ignore_eos=True))] for m in ("ar", "diffusion", "lossless", "mock_ar")]
    assert outs[True] == outs[False]


def test_blocks_longer_than_the_block_scan_take_the_chunked_scan(towers):
    """A block past kernels.MAX_BLOCK_LEN (64) is scanned in chunks on gathered states, verify and rewind
    included: lossless at S 80 still equals greedy AR."""
    ex = InProcessExecutor(*towers, PoolLimits(slots=2, max_model_len=300, max_block_size=100, min_window=16))
    eng = Engine(ex, ModelLimits(260, 300, 100), max_num_seqs=2)
    ar = eng.generate([[5, 6, 7]], P(mode="ar", max_tokens=150, ignore_eos=True))[0]
    ll = eng.generate([[5, 6, 7]], P(mode="lossless", block_size=80, steps_per_block=1, max_tokens=150,
                                     ignore_eos=True))[0]  # fmt: skip
    assert ll.output_ids == ar.output_ids and len(ar.output_ids) == 150
