"""Request validation: every bad SamplingParams field raises ValueError naming it; bad prompts are refused
by Engine.add_request before anything is queued."""

from __future__ import annotations

import pytest

from twotower.cluster.engine.engine import Engine
from twotower.cluster.engine.executor import TowerExecutor
from twotower.cluster.engine.params import ModelLimits, SamplingParams
from twotower.cluster.engine.tokenizer import ByteTokenizer

LIMITS = ModelLimits(vocab_size=260, max_model_len=64, max_block_size=32)


def bad(field: str, prompt_len: int | None = 4, **kw) -> None:
    kw.setdefault("max_tokens", 8)
    with pytest.raises(ValueError, match=rf"^SamplingParams\.{field}:"):
        SamplingParams(**kw).validate(LIMITS, prompt_len)


def test_defaults_and_good_values_pass():
    for kw in [
        {},
        {"mode": "ar", "temperature": 0.7, "top_k": 5, "top_p": 0.9, "seed": 0},
        {"mode": "mock_ar", "top_p": 1.0, "seed": 2**63 - 1},
        {"mode": "lossless", "block_size": 2},
        {"mode": "diffusion", "block_size": 1, "steps_per_block": 1, "gamma": 1.0, "max_tokens": 60},
        {"mode": "diffusion", "block_size": 32, "stop_token_ids": [0, 259], "stop": ["x"]},
    ]:
        sp = SamplingParams(**{"max_tokens": 8, **kw})
        assert sp.validate(LIMITS, 4) is sp
    assert SamplingParams(max_tokens=63).validate(LIMITS) is not None  # no prompt length given


@pytest.mark.parametrize("mode", ["", "AR", "greedy", None, "speculative"])
def test_mode(mode):
    bad("mode", mode=mode)


@pytest.mark.parametrize("n", [0, -1, 1.5, "8", True, None])
def test_max_tokens_type_and_sign(n):
    bad("max_tokens", max_tokens=n)


def test_max_tokens_against_the_context_limit():
    bad("max_tokens", prompt_len=None, max_tokens=64)  # alone at the limit
    bad("max_tokens", prompt_len=None, max_tokens=1000)
    bad("max_tokens", prompt_len=10, max_tokens=55)  # prompt + max_tokens = 65 > 64
    SamplingParams(max_tokens=54).validate(LIMITS, 10)  # = 64 fits exactly


@pytest.mark.parametrize("t", [-0.1, -1, float("nan"), "0.5", None, 1e6])
def test_temperature(t):
    bad("temperature", temperature=t)


@pytest.mark.parametrize("k", [-1, 1.0, None])
def test_top_k(k):
    bad("top_k", top_k=k)


@pytest.mark.parametrize("p", [0.0, -0.5, 1.0001, 2, float("nan"), None])
def test_top_p(p):
    bad("top_p", top_p=p)


@pytest.mark.parametrize("s", [-1, 2**63, 1.5, "7"])
def test_seed(s):
    bad("seed", seed=s)


@pytest.mark.parametrize("ids", [[260], [-1], [5, 1000], [2.0], ["a"]])
def test_stop_token_ids(ids):
    bad("stop_token_ids", stop_token_ids=ids)


@pytest.mark.parametrize("stop", [[""], ["ok", ""], [None], [3]])
def test_stop_strings(stop):
    bad("stop", stop=stop)


@pytest.mark.parametrize("s", [0, -4, 33, 1000, 4.0, None])
def test_block_size(s):
    bad("block_size", block_size=s)


@pytest.mark.parametrize("t", [0, -1, 2.5, None])
def test_steps_per_block(t):
    bad("steps_per_block", steps_per_block=t)


@pytest.mark.parametrize("g", [0.0, -0.1, 1.0001, 2, float("nan"), None])
def test_gamma(g):
    bad("gamma", gamma=g)


def test_lossless_needs_greedy_and_blocks_of_two():
    bad("temperature", mode="lossless", temperature=0.5)
    bad("block_size", mode="lossless", block_size=1)
    SamplingParams(mode="lossless", temperature=0.0, block_size=2, max_tokens=8).validate(LIMITS, 4)


def test_empty_prompt_is_refused_by_validate():
    with pytest.raises(ValueError, match="prompt"):
        SamplingParams(max_tokens=8).validate(LIMITS, 0)


# ---- Engine.add_request --------------------------------------------------------------------------------


class _NoTowers(TowerExecutor):
    """Validation must fail before any tower work: every tower operation raises."""

    def _never(self, *a, **kw):
        raise AssertionError("a tower operation ran during validation")

    add_rows = keep_rows = decode = extend = verify = rewind = denoise = mock_ar = score = _never

    def close_lane(self, lane):
        pass


def _engine(tokenizer=None) -> Engine:
    return Engine(_NoTowers(), LIMITS, tokenizer=tokenizer)


@pytest.mark.parametrize("prompt", [[5, 260], [-1, 5], [5, 6.0], [5, "a"], [5, None], [5, True]])
def test_add_request_bad_token_ids(prompt):
    eng = _engine()
    with pytest.raises(ValueError, match="prompt"):
        eng.add_request(prompt, SamplingParams(max_tokens=4))
    assert not eng.has_unfinished()


def test_add_request_empty_prompt():
    eng = _engine(ByteTokenizer())
    for prompt in ([], ""):
        with pytest.raises(ValueError, match="prompt"):
            eng.add_request(prompt, SamplingParams(max_tokens=4))
    assert not eng.has_unfinished()


def test_add_request_text_prompt_needs_a_tokenizer():
    eng = _engine()
    with pytest.raises(ValueError, match="prompt.*tokenizer"):
        eng.add_request("hello", SamplingParams(max_tokens=4))
    assert not eng.has_unfinished()
    # with one it is accepted (and only queued)
    eng = _engine(ByteTokenizer())
    req = eng.add_request("hello", SamplingParams(max_tokens=4))
    assert req.prompt_ids == ByteTokenizer().encode("hello")
    assert eng.scheduler.num_waiting == 1


def test_add_request_checks_the_params_against_the_prompt():
    eng = _engine()
    with pytest.raises(ValueError, match="max_tokens"):
        eng.add_request(list(range(4, 24)), SamplingParams(max_tokens=45))  # 20 + 45 > 64
    with pytest.raises(ValueError, match="gamma"):
        eng.add_request([5, 6], SamplingParams(gamma=0.0, max_tokens=4))
    assert not eng.has_unfinished()


def test_duplicate_request_id_is_refused():
    eng = _engine()
    eng.add_request([5, 6], SamplingParams(max_tokens=4), request_id="a")
    with pytest.raises(ValueError, match="request_id"):
        eng.add_request([5, 6], SamplingParams(max_tokens=4), request_id="a")
