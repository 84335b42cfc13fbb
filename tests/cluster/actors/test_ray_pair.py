"""The tower pair on local Ray (CPU, gloo): same tokens as the in-process engine in every mode, deltas
of exactly the expected size, and a dead actor failing requests quickly instead of hanging."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
import torch

ray = pytest.importorskip("ray")

from twotower.cluster.actors.config import PairConfig  # noqa: E402
from twotower.cluster.actors.pair import TowerPair, TowerPairError  # noqa: E402
from twotower.cluster.actors.ray_executor import RayExecutor  # noqa: E402
from twotower.cluster.engine.async_engine import AsyncEngine  # noqa: E402
from twotower.cluster.engine.config import EngineConfig  # noqa: E402
from twotower.cluster.engine.engine import Engine  # noqa: E402
from twotower.cluster.engine.errors import EngineError  # noqa: E402
from twotower.cluster.engine.executor import InProcessExecutor  # noqa: E402
from twotower.cluster.engine.params import ModelLimits, SamplingParams  # noqa: E402
from twotower.towers.checkpoint import save_twotower  # noqa: E402
from twotower.towers.config import preset  # noqa: E402
from twotower.towers.context import ContextTower  # noqa: E402
from twotower.towers.denoiser import DenoiserTower  # noqa: E402
from twotower.towers.init import init_random_  # noqa: E402

LIMITS = ModelLimits(vocab_size=260, max_model_len=512)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    cfg = preset("tiny").replace(vocab_size=260)
    ctx, den = init_random_(ContextTower(cfg), 0), init_random_(DenoiserTower(cfg), 1)
    with torch.no_grad():  # a confident denoiser so that blocks commit several tokens per step
        den.lm_head.weight.mul_(30)
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_twotower(path, ctx, den)
    return path


@pytest.fixture(scope="module")
def ray_local():
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=200 * 1024**2, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def pair(ray_local, model_dir):
    p = TowerPair(str(model_dir), PairConfig(replica_cpus=0.1), EngineConfig(eager=True), ready_timeout_s=60)
    yield p
    p.shutdown()


def _in_process(model_dir) -> Engine:
    from twotower.towers.checkpoint import load_tower

    ex = InProcessExecutor(load_tower(model_dir, "context"), load_tower(model_dir, "denoiser"))
    return Engine(ex, LIMITS)


def _requests() -> list[tuple[list[int], SamplingParams]]:
    g = torch.Generator().manual_seed(7)
    out = []
    specs = [dict(mode="ar"), dict(mode="mock_ar"), dict(mode="diffusion", block_size=4, gamma=0.3),
             dict(mode="diffusion", block_size=8, gamma=0.5), dict(mode="lossless", block_size=4)]  # fmt: skip
    for i, spec in enumerate(specs * 2):
        prompt = torch.randint(4, 260, (int(torch.randint(1, 20, (1,), generator=g)),), generator=g).tolist()
        out.append((prompt, SamplingParams(max_tokens=6 + 3 * i, ignore_eos=True, **spec)))
    return out


def test_pair_equals_in_process_engine(pair, model_dir):
    reqs = _requests()
    local = _in_process(model_dir)
    want = [local.generate([p], sp)[0].output_ids for p, sp in reqs]
    remote = Engine(RayExecutor(pair), LIMITS)
    alone = [remote.generate([p], sp)[0].output_ids for p, sp in reqs]  # batch 1
    batched = [r.output_ids for r in remote.generate([p for p, _ in reqs], [sp for _, sp in reqs])]
    assert alone == want
    assert batched == want


def test_delta_bytes_match_the_formula(pair, model_dir):
    """Per committed block only new data moves: S new K/V rows per attention layer and the changed rows'
    Mamba states (plus 4 small bookkeeping tensors: slots, since, lengths [b]; changed slots)."""
    cfg = preset("tiny").replace(vocab_size=260)
    ex = RayExecutor(pair)
    lane, b, S, prompt_len = "bytes-test", 3, 8, 5
    ex.add_rows(lane, [[7] * prompt_len] * b, None, uses_denoiser=True).result()
    ex.drain()
    first = ex.delta_bytes
    ex.extend(lane, torch.full((b, S), 9), torch.tensor([S, S, 0]))  # two rows commit a block
    ex.drain()
    n_attn, n_mamba = cfg.pattern.count("*"), cfg.pattern.count("M")
    kv_row = 2 * cfg.num_key_value_heads * cfg.head_dim * 4  # k and v, float32
    mamba_row = cfg.conv_dim * cfg.conv_kernel * 4 + cfg.mamba_num_heads * cfg.mamba_head_dim * cfg.ssm_state_size * 4
    header = lambda changed: 8 * (3 * b + changed)  # slots, since, lengths, changed (int64)  # noqa: E731
    assert first == b * prompt_len * n_attn * kv_row + b * n_mamba * mamba_row + header(b)
    assert ex.delta_bytes - first == 2 * S * n_attn * kv_row + 2 * n_mamba * mamba_row + header(2)
    ex.close_lane(lane)
    ex.drain()


def test_killing_an_actor_fails_requests_quickly(ray_local, model_dir):
    pair = TowerPair(str(model_dir), PairConfig(replica_cpus=0.1), EngineConfig(eager=True), ready_timeout_s=60)
    engine = AsyncEngine(Engine(RayExecutor(pair), LIMITS))

    async def main() -> tuple[str, float]:
        stream = engine.generate([5, 6, 7], SamplingParams(mode="diffusion", block_size=4, max_tokens=400,
                                                           ignore_eos=True, gamma=0.99))  # fmt: skip
        await stream.__anext__()  # generation is under way
        ray.kill(pair.denoiser)
        t0 = time.monotonic()
        try:
            async for _ in stream:
                pass
        except EngineError as e:
            return str(e), time.monotonic() - t0
        return "", time.monotonic() - t0

    msg, seconds = asyncio.run(asyncio.wait_for(main(), timeout=60))
    print(f"stream failed {seconds:.2f} s after the kill: {msg}")
    assert "died" in msg or "down" in msg, msg
    assert seconds < 30
    with pytest.raises(TowerPairError):
        pair.check_health(timeout_s=5)
    pair.shutdown()


# ---- the prefix cache through the pair: the denoiser's mirror gets a seated prefix in the first delta -----
G = 64


@pytest.fixture(scope="module")
def cached(ray_local, tmp_path_factory):
    """A pair over long-memory random towers (their states matter) with a 64-token cache grid."""
    from tests.cluster.engine.test_prefix_cache import Towers

    tw = Towers()
    path = tmp_path_factory.mktemp("ckpt") / "long-memory"
    save_twotower(path, tw.ctx, tw.sharp)
    cfg = EngineConfig(eager=True, max_num_seqs=8, max_model_len=512, prefix_cache_grid=G)
    p = TowerPair(str(path), PairConfig(replica_cpus=0.1), cfg, ready_timeout_s=60)
    yield p, tw
    p.shutdown()


def test_pair_with_prefix_cache_equals_cache_off_in_process(cached):
    from tests.cluster.engine.test_engine import EOS, MASK
    from tests.cluster.engine.test_prefix_cache import SPECS, run, workload
    from twotower.cluster.engine.slots import PoolLimits

    pair, tw = cached
    kw = dict(mask_token_id=MASK, eos_token_ids=(EOS,), max_num_seqs=8)
    load = workload()
    for mode, spec in SPECS.items():
        params = SamplingParams(max_tokens=G + 8, ignore_eos=True, **spec)
        local = Engine(InProcessExecutor(tw.ctx, tw.sharp, PoolLimits(8, 512, 16)), LIMITS, **kw)
        ex = RayExecutor(pair)
        before = ex.prefix_cache_stats().result().hit_tokens
        assert run(Engine(ex, LIMITS, **kw), load, params) == run(local, load, params), mode
        assert ex.prefix_cache_stats().result().hit_tokens - before >= 6 * G, mode


def test_a_seated_prefix_reaches_the_mirror_once_in_the_first_delta(cached):
    """The second lane's prompt is seated from 2 cached blocks, yet its first delta is exactly the size of
    the first lane's: the whole prefix's K/V rows once, plus the Mamba states; nothing more follows."""
    pair, _ = cached
    cfg = preset("tiny").replace(vocab_size=260)
    ex = RayExecutor(pair)
    prompt = torch.randint(4, 260, (2 * G + 5,), generator=torch.Generator().manual_seed(11)).tolist()
    hits0 = ex.prefix_cache_stats().result().hit_tokens
    sizes = []
    for lane in ("owner", "seated"):
        before = ex.delta_bytes
        ex.add_rows(lane, [prompt], None, uses_denoiser=True).result()
        ex.drain()
        sizes.append(ex.delta_bytes - before)
    assert ex.prefix_cache_stats().result().hit_tokens - hits0 == 2 * G
    n_attn, n_mamba = cfg.pattern.count("*"), cfg.pattern.count("M")
    kv_row = 2 * cfg.num_key_value_heads * cfg.head_dim * 4
    mamba_row = cfg.conv_dim * cfg.conv_kernel * 4 + cfg.mamba_num_heads * cfg.mamba_head_dim * cfg.ssm_state_size * 4
    assert sizes == [len(prompt) * n_attn * kv_row + n_mamba * mamba_row + 8 * 4] * 2
    for lane in ("owner", "seated"):
        ex.close_lane(lane)
    ex.drain()
