"""The memory-bound cost model (twotower/cluster/cli/cost_model.py): its counts agree with the engine's own forward
counts and with the router's top-k, its byte formula with a parameter count written out here, and the
meter leaves the runners as it found them."""

from __future__ import annotations

import pytest
import torch

from twotower.cluster.cli.cost_model import BYTES, Cost, CostMeter, TowerBytes, speedup
from twotower.cluster.engine.config import EngineConfig
from twotower.cluster.engine.loading import BUNDLED_MODEL, build_engine, load_model
from twotower.cluster.engine.params import SamplingParams
from twotower.towers.moe import TopkRouter

pytestmark = pytest.mark.skipif(not (BUNDLED_MODEL / "config.json").is_file(), reason="no bundled model")
PROMPT = "import os\n\n\ndef main(argv):\n    "


@pytest.fixture(scope="module")
def engine():
    return build_engine(load_model(BUNDLED_MODEL), EngineConfig(max_num_seqs=4, eager=True))


def _run(engine, **kw) -> tuple[Cost, object]:
    sp = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, **kw)
    with CostMeter(engine.ex) as meter:
        req = engine.generate([PROMPT], sp)[0]
    return meter.cost(len(req.output_ids)), req


def test_dense_count_matches_the_parameter_names(engine):
    for tower in (engine.ex.ctx.tower, engine.ex.den.tower):
        dense = sum(p.numel() for n, p in tower.named_parameters()
                    if ".experts." not in n and "embeddings" not in n)  # fmt: skip
        tb = TowerBytes(tower)
        assert tb.dense == dense
        cfg = tower.cfg
        assert tb.expert == tower.model.layers[cfg.layer_indices("E")[0]].mixer.experts.up_proj[0].numel() * 2


def test_ar_touches_top_k_experts_and_bytes_follow_the_formula(engine):
    cost, req = _run(engine, mode="ar")
    ctx, cfg = cost.towers["context"], engine.ex.ctx.tower.cfg
    n_moe = len(cfg.layer_indices("E"))
    # the prefill is not counted: its logits give the first token, each later one is a decode forward
    assert ctx.forwards == req.usage.context_forwards - 1 == cost.tokens - 1
    assert ctx.experts_per_layer == cfg.num_experts_per_tok and ctx.moe_calls == n_moe * ctx.forwards
    assert cost.towers["denoiser"].forwards == 0 and cost.towers["denoiser"].bytes == 0
    tb, P = TowerBytes(engine.ex.ctx.tower), len(req.prompt_ids)
    # decode j feeds generated token j after the prompt and the j tokens before it
    want = sum(tb.forward(1, P + j, cfg.num_experts_per_tok * n_moe, writes_state=True)
               for j in range(cost.tokens - 1))  # fmt: skip
    assert ctx.bytes == want
    assert want > BYTES * tb.dense * ctx.forwards  # weights, plus experts and state
    assert speedup(cost, cost) == 1.0


def test_block_modes_agree_with_the_engine_counts(engine):
    ar, _ = _run(engine, mode="ar")
    E = engine.ex.ctx.tower.cfg.n_routed_experts
    k = engine.ex.ctx.tower.cfg.num_experts_per_tok
    for kw in (dict(mode="diffusion", block_size=8), dict(mode="lossless", block_size=8, steps_per_block=1),
               dict(mode="mock_ar")):  # fmt: skip
        cost, req = _run(engine, **kw)
        den, ctx = cost.towers["denoiser"], cost.towers["context"]
        assert den.forwards == req.usage.denoiser_forwards
        assert ctx.forwards == req.usage.context_forwards - 1  # less the prefill
        S = 1 if kw["mode"] == "mock_ar" else 8
        assert k <= den.experts_per_layer <= min(E, S * k)
        assert cost.tokens == 24 and speedup(cost, ar) > 0
    # mock-AR reads both towers' weights for every token: it must cost more per token than AR
    assert cost.bytes_per_token > ar.bytes_per_token


def test_meter_restores_the_runners_and_refuses_batches(engine):
    ex = engine.ex
    routers = [m for m in ex.ctx.tower.modules() if isinstance(m, TopkRouter)]
    _run(engine, mode="ar")
    assert "run" not in vars(ex.ctx.steps) and "run" not in vars(ex.den.steps) and "_prefill" not in vars(ex.ctx)
    assert all(not r._forward_hooks for r in routers)
    sp = SamplingParams(mode="ar", max_tokens=4, temperature=0.0, ignore_eos=True)
    with CostMeter(ex):  # two rows in one lane: the meter's refusal fails that lane's requests
        failed = engine.generate([PROMPT, PROMPT + "x"], sp)
    assert [r.finish_reason.value for r in failed] == ["error", "error"]
    assert "run" not in vars(ex.ctx.steps) and all(not r._forward_hooks for r in routers)
    out = engine.generate([PROMPT], sp)[0]  # the engine still serves
    assert len(out.output_ids) == 4


def test_cost_add_sums_each_tower():
    a, b = Cost(tokens=3), Cost(tokens=5)
    a.towers["context"].bytes, b.towers["context"].bytes, b.towers["denoiser"].bytes = 10, 20, 40
    b.towers["denoiser"].experts, b.towers["denoiser"].moe_calls = 6, 2
    a.add(b)
    assert (a.tokens, a.bytes, a.bytes_per_token) == (8, 70, 70 / 8)
    assert a.towers["denoiser"].experts_per_layer == 3.0
    torch.testing.assert_close(torch.tensor(speedup(a, Cost(tokens=1, towers=b.towers))), torch.tensor(60 / (70 / 8)))
