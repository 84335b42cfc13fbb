"""An op that raises fails only the requests of its lane: the engine, its other lanes and later requests
keep serving, and only a dead tower makes an engine unhealthy. Sampling is finite for every temperature
validation accepts."""

from __future__ import annotations

import asyncio

import pytest

from twotower.cluster.engine.async_engine import AsyncEngine
from twotower.cluster.engine.engine import Engine
from twotower.cluster.engine.errors import LaneFailed
from twotower.cluster.engine.executor import InProcessExecutor
from twotower.cluster.engine.params import ModelLimits, SamplingParams
from twotower.cluster.engine.request import FinishReason
from twotower.towers.config import preset
from twotower.towers.context import ContextTower
from twotower.towers.denoiser import DenoiserTower
from twotower.towers.init import init_random_

CFG = preset("tiny").replace(vocab_size=260)
LIMITS = ModelLimits(vocab_size=260, max_model_len=256)
MODES = [("ar", {}), ("mock_ar", {}), ("lossless", {"block_size": 4}), ("diffusion", {"block_size": 4})]


class FaultyExecutor(InProcessExecutor):
    """Raises inside the n-th denoiser forward of the diffusion lanes (once)."""

    def __init__(self, *a, fail_at: int = 3) -> None:
        super().__init__(*a)
        self.calls, self.fail_at = 0, fail_at

    def denoise(self, lane, *a):
        if lane.startswith("diffusion"):
            self.calls += 1
            if self.calls == self.fail_at:
                raise RuntimeError("boom: secret detail 10.0.0.7")
        return super().denoise(lane, *a)


@pytest.fixture(scope="module")
def towers():
    return init_random_(ContextTower(CFG).eval(), 0), init_random_(DenoiserTower(CFG).eval(), 1)


def _params(mode, extra, **kw):
    return SamplingParams(mode=mode, max_tokens=14, ignore_eos=True, **{**extra, **kw})


def _submit(eng: Engine) -> dict:
    return {mode: [eng.add_request([5 + i, 9, 11 + i], _params(mode, extra)) for i in range(2)]
            for mode, extra in MODES}  # fmt: skip


def _run(eng: Engine) -> None:
    for _ in range(500):
        if not eng.has_unfinished():
            return
        eng.step()
    raise AssertionError("requests did not finish")


def test_a_failing_op_fails_only_its_lane(towers):
    clean = Engine(InProcessExecutor(*towers), LIMITS)
    want = _submit(clean)
    _run(clean)
    faulty = FaultyExecutor(*towers)
    eng = Engine(faulty, LIMITS)
    got = _submit(eng)
    _run(eng)
    assert faulty.calls >= 3
    for mode, _ in MODES:
        if mode == "diffusion":
            assert all(r.finish_reason is FinishReason.ERROR for r in got[mode])
        else:  # the other lanes ran on, unchanged
            assert [r.output_ids for r in got[mode]] == [r.output_ids for r in want[mode]], mode
    failures = eng.take_failures()
    assert {r.request_id for r, _ in failures} == {r.request_id for r in got["diffusion"]}
    assert all(isinstance(e, LaneFailed) and "secret" not in str(e) and e.error_id in str(e) for _, e in failures)
    assert len(faulty.ctx.table.free) == faulty.ctx.limits.slots  # the failed lane's slots were freed
    again = eng.add_request([5, 9, 11], _params("diffusion", {"block_size": 4}))  # the next request succeeds
    _run(eng)
    assert again.finish_reason is not FinishReason.ERROR
    assert again.output_ids == want["diffusion"][0].output_ids


def test_the_failing_lane_s_streams_get_an_opaque_error_and_the_engine_stays_healthy(towers):
    async def main():
        aeng = AsyncEngine(Engine(FaultyExecutor(*towers, fail_at=2), LIMITS))

        async def collect(mode, extra):
            toks = []
            async for out in aeng.generate([5, 9, 11], _params(mode, extra)):
                toks += out.new_token_ids
            return toks

        results = await asyncio.gather(*(collect(m, e) for m, e in MODES), return_exceptions=True)
        return aeng, results

    aeng, results = asyncio.run(main())
    errors = {m: r for (m, _), r in zip(MODES, results, strict=True) if isinstance(r, BaseException)}
    assert set(errors) == {"diffusion"} and isinstance(errors["diffusion"], LaneFailed)
    assert "boom" not in str(errors["diffusion"])
    assert all(len(r) == 14 for m, r in zip([m for m, _ in MODES], results, strict=True) if m != "diffusion")
    assert aeng.dead is None


@pytest.mark.parametrize("mode,extra", [("ar", {}), ("mock_ar", {}), ("diffusion", {"block_size": 4})])
def test_a_tiny_temperature_is_served(towers, mode, extra):
    eng = Engine(InProcessExecutor(*towers), LIMITS)
    greedy = eng.add_request([5, 9, 11], _params(mode, extra))
    tiny = eng.add_request([5, 9, 11], _params(mode, extra, temperature=1e-300, seed=3))
    _run(eng)
    assert tiny.finish_reason is not FinishReason.ERROR and len(tiny.output_ids) == 14
    assert tiny.output_ids == greedy.output_ids  # the limit of a vanishing temperature is greedy


def test_a_lone_surrogate_prompt_is_refused_by_name(towers):
    from twotower.cluster.engine.tokenizer import ByteTokenizer

    eng = Engine(InProcessExecutor(*towers), LIMITS, tokenizer=ByteTokenizer())
    with pytest.raises(ValueError, match="prompt: not valid Unicode text"):
        eng.add_request("def f(\ud800", _params("ar", {}))
    with pytest.raises(ValueError, match="continuation: not valid Unicode text"):
        eng.score("ok", "\udfff")
    assert not eng.has_unfinished()
