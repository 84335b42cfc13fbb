"""The OpenAI API's evaluation features on the real server (bundled model, in process): logprobs with top
alternatives as token text, echo with prompt logprobs equal to Score's, the tokenizer routes, and chat
refused for a model without a chat template."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient

from twotower.cluster.engine.loading import BUNDLED_MODEL
from twotower.cluster.ingress.openai_app import build_openai_app
from twotower.cluster.serve.server import TowerPairServer

pytestmark = pytest.mark.skipif(not (BUNDLED_MODEL / "config.json").is_file(), reason="no bundled model")
NAME = "tt"
PROMPT = "def add(a, b):\n    return"


@pytest.fixture(scope="module")
def server():
    torch.set_num_threads(1)
    return TowerPairServer({"model": str(BUNDLED_MODEL), "served_model_name": NAME, "pair": {"enabled": False},
                            "engine": {"eager": True, "max_num_seqs": 4, "max_model_len": 512}})  # fmt: skip


@pytest.fixture(scope="module")
def http(server):
    with TestClient(build_openai_app(server, NAME)) as client:
        yield client


def test_echo_prompt_logprobs_equal_score(http, server):
    ids = http.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    r = http.post("/v1/completions", json={"prompt": ids, "max_tokens": 1, "logprobs": 1, "echo": True,
                                           "temperature": 0, "mode": "ar", "seed": 1234})  # fmt: skip
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 1 and lp["token_logprobs"][0] is None
    _, want, _ = server.engine.engine.score(ids[:1], ids[1:])
    torch.testing.assert_close(torch.tensor(lp["token_logprobs"][1 : len(ids)]), torch.tensor(want))
    assert "".join(lp["tokens"][: len(ids)]) == PROMPT and r.json()["choices"][0]["text"].startswith(PROMPT)
    for t, top in zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:], strict=True):
        assert t <= max(top.values()) + 1e-6 and len(top) in (1, 2)  # the top one, and the token if not it


def test_top_alternatives_of_greedy_ar_are_led_by_the_sampled_token(http):
    body = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "mode": "ar", "ignore_eos": True}
    plain = http.post("/v1/completions", json={**body, "logprobs": 0}).json()["choices"][0]["logprobs"]
    top = http.post("/v1/completions", json={**body, "logprobs": 3}).json()["choices"][0]["logprobs"]
    assert plain["tokens"] == top["tokens"] and not any(t.startswith("token_id:") for t in top["tokens"])
    # the engine's sampling logprobs and the context tower's teacher-forced score agree for greedy AR
    torch.testing.assert_close(torch.tensor(top["token_logprobs"]), torch.tensor(plain["token_logprobs"]),
                               atol=1e-4, rtol=0)  # fmt: skip
    for tok, lp, alts in zip(top["tokens"], top["token_logprobs"], top["top_logprobs"], strict=True):
        assert len(alts) == 3 and max(alts, key=alts.get) == tok and alts[tok] == lp


def test_tokenizer_routes_and_chat_without_a_template(http):
    ids = http.post("/tokenize", json={"prompt": PROMPT}).json()
    assert ids["count"] == len(ids["tokens"]) > 3 and ids["max_model_len"] == 512
    assert http.post("/detokenize", json={"tokens": ids["tokens"]}).json() == {"prompt": PROMPT}
    info = http.get("/tokenizer_info").json()
    assert info["eos_token"] == "</s>" and info["bos_token"] == "<s>" and info["chat_template"] is None
    assert http.post("/detokenize", json={"tokens": [10**6]}).status_code == 400
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and "no chat template" in r.json()["error"]["message"]
