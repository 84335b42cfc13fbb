"""Hostile input over both APIs against the real tower-pair server (in-process towers, a tiny random model):
every malformed request gets a bad-input status (INVALID_ARGUMENT / 4xx), never INTERNAL, UNKNOWN or a
5xx, and after every 50 cases the server is healthy and serves a valid generation.

Cases are drawn from a seeded generator: wrong types and out-of-range values for every sampling field,
extreme numbers (1e-300, 1e308, NaN, huge ints), bad prompts (lone surrogates, empty, out-of-vocabulary
ids, over-long), unknown fields, deep or malformed JSON and bad headers (HTTP), oneof mix-ups and bad
request ids (gRPC). Valid requests are mixed in and must succeed.
"""

from __future__ import annotations

import json
import math
import random

import grpc
import pytest
import torch
from fastapi.testclient import TestClient

from twotower.cluster.ingress import grpc_service as gi
from twotower.cluster.ingress.openai_app import build_openai_app
from twotower.cluster.serve.server import TowerPairServer
from twotower.protos import pb2, pb2_grpc
from twotower.towers.checkpoint import save_twotower
from twotower.towers.config import preset
from twotower.towers.context import ContextTower
from twotower.towers.denoiser import DenoiserTower
from twotower.towers.init import init_random_

from .grpc_harness import running_grpc

NAME = "tiny"
BAD_STATUSES = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
WEIRD = [None, True, -1, 0, 1, 2**40, -(2**63), 1e-300, 1e308, -0.5, 0.5, 101.0, "x", "", [], [1], {}, {"a": 1}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    cfg = preset("tiny").replace(vocab_size=260, max_position_embeddings=256)
    path = tmp_path_factory.mktemp("fuzz") / "tiny"
    save_twotower(path, init_random_(ContextTower(cfg), 0), init_random_(DenoiserTower(cfg), 1))
    return path


def _server(model_dir) -> TowerPairServer:
    torch.set_num_threads(1)
    return TowerPairServer({"model": str(model_dir), "served_model_name": NAME, "pair": {"enabled": False},
                            "engine": {"eager": True, "max_num_seqs": 8, "max_model_len": 128}})  # fmt: skip


@pytest.fixture(scope="module")
def http(model_dir):
    with TestClient(build_openai_app(_server(model_dir), NAME)) as client:
        yield client


@pytest.fixture(scope="module")
def channel(model_dir):
    with running_grpc(lambda: gi.GrpcIngress(_server(model_dir))) as ch:
        yield ch


# ---- HTTP ------------------------------------------------------------------------------------------
HTTP_FIELDS = ["max_tokens", "temperature", "top_p", "top_k", "seed", "n", "stop", "logprobs", "echo", "stream",
               "mode", "block_size", "steps_per_block", "gamma", "ignore_eos", "model", "user", "suffix",
               "presence_penalty", "best_of", "stream_options", "bogus_field"]  # fmt: skip
PROMPTS = ["def f(", "\ud800", "ok\udfff", "", [], [5, 6], [-1], [10**6], [[5], [6, 7]], [[]], [1.5], "x" * 2000,
           [5] * 500, None, 3, {"a": 1}, ["a", 1]]  # fmt: skip


def http_case(rng: random.Random):
    """(kind, body bytes, headers): kind 'valid' must succeed, 'any' must not be a 5xx."""
    body = {"model": NAME, "prompt": "def f(", "max_tokens": 4, "mode": rng.choice(["ar", "diffusion"])}
    headers = {"content-type": "application/json"}
    r = rng.random()
    if r < 0.1:
        return "valid", json.dumps(body).encode(), headers
    if r < 0.55:
        for _ in range(rng.randint(1, 3)):
            body[rng.choice(HTTP_FIELDS)] = rng.choice(WEIRD)
    elif r < 0.75:
        body["prompt"] = rng.choice(PROMPTS)
    elif r < 0.85:
        raw = rng.choice([b"{", b"[]", b"null", b"\xff\xfe{}", b'{"prompt": "\\ud800"}', b"[" * 50000 + b"]" * 50000,
                          b'{"prompt": NaN}', b'{"prompt": "a", "max_tokens": Infinity}', b"",
                          b"\x00" * 10])  # fmt: skip
        return "any", raw, headers
    else:
        headers["X-Request-Id"] = rng.choice([b"", b"a" * 500, b"bad id", "\u00e9t\u00e9".encode(), b"\xe9t\xe9",
                                              b"ok-1", b"\t"])  # raw bytes: non-ASCII reaches the server
    text = json.dumps(body, allow_nan=True)
    return "any", text.encode("utf-8", "surrogatepass"), headers


def test_http_fuzz(http):
    rng = random.Random(0)
    statuses: dict[int, int] = {}
    for i in range(200):
        kind, data, headers = http_case(rng)
        r = http.post("/v1/completions", content=data, headers=headers)
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        assert r.status_code < 500, (i, data[:200], headers, r.status_code, r.text[:300])
        if kind == "valid":
            assert r.status_code == 200, (i, r.text[:300])
        elif r.status_code == 400:
            assert r.json()["error"]["message"], r.text
        if i % 50 == 49:
            assert http.get("/health").status_code == 200
            ok = http.post("/v1/completions", json={"model": NAME, "prompt": "def f(", "max_tokens": 3})
            assert ok.status_code == 200 and len(ok.json()["choices"][0]["text"]) > 0, ok.text
    assert statuses.get(400, 0) > 50, statuses  # the generator does produce bad input


# ---- gRPC ------------------------------------------------------------------------------------------
SAMPLING = {"max_tokens": [0, -5, 2**31 - 1, 1], "temperature": [-1.0, 1e-300, 1e308, math.nan, math.inf, 0.7],
            "top_k": [-3, 10**6, 5], "top_p": [0.0, -0.1, 1.5, math.nan, 0.9], "seed": [0, 2**64 - 1, 2**63, 7],
            "stop_token_ids": [[-1], [10**6], [5]], "stop": [[""], ["\x00"], ["ab"]],
            "block_size": [0, -1, 10**6, 4], "steps_per_block": [0, -2, 10**6, 2],
            "gamma": [0.0, -0.5, 1.5, math.nan, 0.8], "mode": [0, 1, 2, 3, 4, 99, -1]}  # fmt: skip


def grpc_case(rng: random.Random):
    sp = {k: rng.choice(v) for k, v in rng.sample(sorted(SAMPLING.items()), rng.randint(0, 4))}
    sp.setdefault("max_tokens", 3)
    msg = pb2.GenerateRequest(sampling=pb2.SamplingParams(**sp))
    r = rng.random()
    if r < 0.4:
        msg.prompt_text = rng.choice(["def f(", "", "x" * 3000, "\x00", "ok"])
    elif r < 0.8:
        msg.prompt_token_ids.ids.extend(rng.choice([[5, 6], [], [-1], [10**6], [5] * 400, [259], [260]]))
    if rng.random() < 0.2:
        msg.request_id = rng.choice(["", "x" * 1000, "dup", "\u00e9"])
    if rng.random() < 0.2:
        msg.deadline_s = rng.choice([0.0, -1.0, 1e-9, math.nan, 1e308, 5.0])
    return msg


def test_grpc_fuzz(channel):
    stub = pb2_grpc.TwoTowerStub(channel)
    rng = random.Random(1)
    codes: dict[str, int] = {}
    for i in range(150):
        msg = grpc_case(rng)
        try:
            list(stub.Generate(msg, timeout=30))
            code = grpc.StatusCode.OK
        except grpc.RpcError as e:
            code = e.code()
            assert code not in BAD_STATUSES, (i, msg, code, e.details())
        codes[code.name] = codes.get(code.name, 0) + 1
        if i % 50 == 49:
            chunks = list(stub.Generate(pb2.GenerateRequest(prompt_text="def f(",
                                                            sampling=pb2.SamplingParams(max_tokens=3)), timeout=30))
            assert chunks and chunks[-1].finished
    assert codes.get("INVALID_ARGUMENT", 0) > 30, codes
