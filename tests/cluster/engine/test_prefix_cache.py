"""The context tower's prefix cache (prefix_cache.py): with it on, every mode's greedy float32 output is
token-identical to the cache off, for prompts sharing 0, 1 and many grid blocks, a shared prefix ending
mid-block, a hit while the entry's owner is still running, and eviction under a tiny budget; the
budget holds after every step and an entry on a running sequence's chain is never evicted."""

from __future__ import annotations

import math
import random

import pytest
import torch

from twotower.cluster.engine.config import EngineConfig, PrefixCacheConfig
from twotower.cluster.engine.engine import Engine
from twotower.cluster.engine.executor import InProcessExecutor
from twotower.cluster.engine.loading import BUNDLED_MODEL, build_engine, load_model
from twotower.cluster.engine.params import SamplingParams
from twotower.cluster.engine.slots import PoolLimits
from twotower.cluster.engine.tokenizer import ByteTokenizer
from twotower.towers.context import ContextTower
from twotower.towers.denoiser import DenoiserTower
from twotower.towers.init import init_random_
from twotower.towers.mamba2 import Mamba2Mixer

from .test_engine import CFG, EOS, LIMITS, MASK, MODES, SHARP, P

G = 64
SPECS = {"ar": dict(mode="ar"), "mock_ar": dict(mode="mock_ar"),
         "diffusion": dict(mode="diffusion", block_size=4, gamma=0.3),
         "lossless": dict(mode="lossless", block_size=4)}  # fmt: skip


@torch.no_grad()
def long_memory_(tower, seed: int):
    """Random weights whose state matters: init_random_'s Mamba layers forget within a few tokens and
    their D skip drowns the SSM output (zeroing every SSM state moves logits by 1e-4, no argmax flips);
    with dt 0.5, A 0.05 and D 0 zeroing the SSM states, the conv states or the KV each changes 15-75% of
    next-token argmaxes, so a wrongly seated slot cannot pass for a right one."""
    init_random_(tower.eval(), seed, std=0.05)
    for mod in tower.modules():
        if isinstance(mod, Mamba2Mixer):
            mod.A_log.fill_(math.log(0.05))
            mod.D.zero_()
            mod.dt_bias.fill_(0.5 + math.log(-math.expm1(-0.5)))  # softplus^-1(0.5)
    return tower


class Towers:
    def __init__(self) -> None:
        self.ctx = long_memory_(ContextTower(CFG), 0)
        self.den = long_memory_(DenoiserTower(CFG), 1)
        self.sharp = long_memory_(DenoiserTower(CFG), 1)
        with torch.no_grad():
            self.sharp.lm_head.weight.mul_(SHARP / 3)  # std 0.05 logits are 2.5x init_random_'s


@pytest.fixture(scope="module")
def tw() -> Towers:
    return Towers()


def engine(tw: Towers, mode: str, cache: PrefixCacheConfig | None) -> Engine:
    den = tw.sharp if mode == "diffusion" else tw.den
    ex = InProcessExecutor(tw.ctx, den, PoolLimits(8, LIMITS.max_model_len, 16, prefix_cache=cache))
    return Engine(ex, LIMITS, mask_token_id=MASK, eos_token_ids=(EOS,), tokenizer=ByteTokenizer(), max_num_seqs=8)


def toks(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(4, 260) for _ in range(n)]


def workload(seed: int = 0) -> list[tuple[int, list[int]]]:
    """(engine step at which it arrives, prompt): the sharing cases of the acceptance list."""
    rng = random.Random(seed)
    long, one = toks(rng, 3 * G + 20), toks(rng, G)
    return [
        (0, long),  # its prefill snapshots 3 grid points
        (0, toks(rng, 2 * G + 5)),  # shares nothing
        (1, long[: 3 * G] + toks(rng, 9)),  # 3 blocks, while `long` is still running
        (1, one + toks(rng, 30)),  # the first of the one-block pair
        (3, long[: G + 37]),  # ends mid-block: seated at G
        (4, long[: 2 * G]),  # exactly 2 blocks: seated at G (its last token is always read)
        (6, one + toks(rng, 50)),  # shares one block
        (8, toks(rng, 40)),  # shorter than a block
    ]


def run(eng: Engine, load: list[tuple[int, list[int]]], params, check=None) -> list[list[int]]:
    """Each prompt is added at the engine step it arrives (load is in arrival order); output ids in order."""
    reqs, step = [], 0
    while len(reqs) < len(load) or eng.has_unfinished():
        while len(reqs) < len(load) and load[len(reqs)][0] <= step:
            reqs.append(eng.add_request(load[len(reqs)][1], params))
        eng.step()
        if check is not None:
            check(eng)
        step += 1
        assert step < 2000
    return [r.output_ids for r in reqs]


@pytest.mark.parametrize("mode", MODES)
def test_cache_on_is_token_identical_to_off(tw, mode):
    load = workload()
    params = P(max_tokens=2 * G + 8, **SPECS[mode])  # long enough that AR output crosses grid points too
    off = run(engine(tw, mode, None), load, params)
    eng = engine(tw, mode, PrefixCacheConfig(G, 1 << 26))
    on = run(eng, load, params)
    assert on == off, mode
    stats = eng.ex.prefix_cache_stats().result()
    # hits: 3 blocks (request 3), 1 (mid-block), 1 (exact two blocks), 1 (one-block pair): 6 blocks
    assert stats.hit_tokens >= 6 * G, stats
    prompt_tokens = sum(len(p) for _, p in load) - (len(load) if mode == "mock_ar" else 0)
    assert stats.prefill_tokens == prompt_tokens - stats.hit_tokens
    assert stats.queries == len(load)



@pytest.mark.parametrize("mode", ["ar", "lossless"])
def test_a_burst_behind_one_prefix_reads_it_once(tw, mode):
    """Four prompts with the same 2-block prefix admitted in one step: the first reads it, the other three
    are seated from its fresh entries in a second pass and read only their own tails."""
    rng = random.Random(4)
    head = toks(rng, 2 * G)
    load = [(0, head + toks(rng, n)) for n in (5, 17, 40, 1)]
    params = P(max_tokens=12, **SPECS[mode])
    eng = engine(tw, mode, PrefixCacheConfig(G, 1 << 26))
    assert run(eng, load, params) == run(engine(tw, mode, None), load, params)
    stats = eng.ex.prefix_cache_stats().result()
    assert stats.hit_tokens == 3 * 2 * G, stats
    assert stats.prefill_tokens == len(load[0][1]) + 17 + 40 + 1, stats
    again = eng.generate([p for _, p in load], params)  # all four are cached now; each request reports it
    assert [r.usage.cached_tokens for r in again] == [2 * G] * 4

def _check_budget_and_pins(eng: Engine) -> None:
    cache = eng.ex.ctx.cache
    assert cache.bytes_used <= cache.budget
    for chain in cache.chains.values():  # every running sequence's entries are still cached
        for e in chain.entries:
            assert cache.entries.get(e.key) is e and e.pins > 0


def eviction_workload() -> list[tuple[int, list[int]]]:
    """Three 2-block prefixes one after another (each done before the next arrives), then two that
    come back, and a last one that arrives while another runs."""
    rng = random.Random(3)
    a, b, c = (toks(rng, 2 * G + 10) for _ in range(3))
    return [(0, a), (25, b), (50, c), (75, a[: 2 * G] + toks(rng, 7)), (100, c[: 2 * G] + toks(rng, 3)),
            (101, b[: G + 5])]  # fmt: skip


@pytest.mark.parametrize("mode", ["ar", "diffusion"])
def test_tiny_budget_evicts_but_never_an_entry_in_use(tw, mode):
    """A budget of 4.5 entries for a workload that snapshots more: the cache evicts, never holds more
    than the budget, never drops a pinned entry, and the output still equals the cache off."""
    load = eviction_workload()
    params = P(max_tokens=16, **SPECS[mode])
    off = run(engine(tw, mode, None), load, params)
    probe = engine(tw, mode, PrefixCacheConfig(G, 1 << 26))
    budget = 4 * probe.ex.ctx.cache.entry_bytes + probe.ex.ctx.cache.entry_bytes // 2
    eng = engine(tw, mode, PrefixCacheConfig(G, budget))
    assert run(eng, load, params, check=_check_budget_and_pins) == off
    stats = eng.ex.prefix_cache_stats().result()
    assert stats.evictions > 0 and stats.entries <= 4 and stats.bytes_used <= budget, stats
    assert stats.inserted == stats.entries + stats.evictions
    assert stats.hit_tokens > 0, stats  # what was not evicted was still used


def test_zero_budget_caches_nothing(tw):
    load = workload(2)
    params = P(max_tokens=8, **SPECS["ar"])
    eng = engine(tw, "ar", PrefixCacheConfig(G, 0))
    assert run(eng, load, params, check=_check_budget_and_pins) == run(engine(tw, "ar", None), load, params)
    stats = eng.ex.prefix_cache_stats().result()
    assert stats.entries == stats.inserted == stats.hit_tokens == 0 and stats.queries == len(load)


SYSTEM = ('"""A command-line tool that reads a configuration file, validates every field and writes a report.\n'
          'Each section names its inputs, the checks it runs and what it prints when a check fails."""\n\n'
          "import argparse\nimport json\nimport os\nimport sys\nfrom dataclasses import dataclass, field\n\n\n"
          "@dataclass\nclass Config:\n    path: str\n    retries: int = 3\n    verbose: bool = False\n"
          "    tags: list[str] = field(default_factory=list)\n\n    def validate(self) -> None:\n"
          "        if self.retries < 0:\n"
          "            raise ValueError('retries must be non-negative')\n\n\n")  # fmt: skip
TAILS = ["def parse_args(argv):\n", "def load(path):\n    with open(path) as f:\n",
         "class Report:\n    def __init__(self", "def main():\n    args = parse_args(sys.argv[1:])\n"]  # fmt: skip


@pytest.mark.skipif(not (BUNDLED_MODEL / "config.json").is_file(), reason="no bundled model")
@pytest.mark.parametrize("mode", MODES)
def test_bundled_model_cache_on_is_token_identical(mode):
    """The bundled model in float32: a shared code prefix of several grid blocks, four different tails
    arriving while the first still runs, and the prefix alone cut mid-block."""
    model = load_model(BUNDLED_MODEL, dtype="float32")
    tok = model.tokenizer
    head = tok.encode(SYSTEM)
    assert len(head) >= 2 * G + 10, len(head)
    load = [(i, tok.encode(SYSTEM + t)) for i, t in enumerate(TAILS)] + [(5, head[: G + 21])]
    params = SamplingParams(max_tokens=G + 8, ignore_eos=True, **SPECS[mode])
    outs = []
    for on in (False, True):
        eng = build_engine(model, EngineConfig(eager=True, prefix_cache=on, prefix_cache_grid=G))
        outs.append(run(eng, load, params))
        if on:
            stats = eng.ex.prefix_cache_stats().result()
            assert stats.hit_tokens >= len(TAILS[1:]) * (len(head) // G) * G, stats
    assert outs[1] == outs[0], mode


@pytest.mark.skipif(not (BUNDLED_MODEL / "config.json").is_file(), reason="no bundled model")
@pytest.mark.parametrize("mode", ["ar", "diffusion"])
def test_bundled_model_tiny_budget_is_token_identical(mode):
    """The bundled model under a 2.5-entry budget: three prefixes one after another evict each other, the
    last and the first come back; budget and pins hold after every step and the output equals the cache off."""
    model = load_model(BUNDLED_MODEL, dtype="float32")
    prompts = [model.tokenizer.encode(f"# {name}.py\n" + SYSTEM + TAILS[0]) for name in ("report", "check", "io")]
    # the last comes back while its entries are the newest (a hit); the first when they are long gone,
    # and its snapshot then finds no room (the running hit pins the only two entries)
    load = [(0, prompts[0]), (30, prompts[1]), (60, prompts[2]), (90, prompts[2]), (91, prompts[0][: G + 9])]
    params = SamplingParams(max_tokens=16, ignore_eos=True, **SPECS[mode])
    off = run(build_engine(model, EngineConfig(eager=True, prefix_cache=False)), load, params)
    probe = build_engine(model, EngineConfig(eager=True, prefix_cache_grid=G))
    budget = int(2.5 * probe.ex.ctx.cache.entry_bytes)
    eng = build_engine(model, EngineConfig(eager=True, prefix_cache_grid=G, prefix_cache_bytes=budget))
    assert run(eng, load, params, check=_check_budget_and_pins) == off
    stats = eng.ex.prefix_cache_stats().result()
    assert stats.evictions > 0 and stats.hit_tokens > 0, stats
