"""Prefix-affinity routing (serve/prefix_router.py). Units: the affinity table, the ranking rule and the
request keys (token ids and text). On local Ray: two tower pairs behind the router keep a workload of 4
distinct prefixes' hit rate (usage.cached_tokens / prompt_tokens) within 10 points of one replica's;
Serve's power-of-two routing on the same pairs is measured alongside."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

ray = pytest.importorskip("ray")
grpc = pytest.importorskip("grpc")

from tests.waiting import wait_for  # noqa: E402
from twotower.cluster.engine.config import EngineConfig  # noqa: E402
from twotower.cluster.engine.prefix_cache import grid_prefix_keys  # noqa: E402
from twotower.cluster.ingress.api_types import GenerateRequest  # noqa: E402
from twotower.cluster.serve.prefix_router import AffinityTable, PrefixAffinityRouter, prefer  # noqa: E402

G = 64


def test_table_returns_the_owner_of_the_longest_known_prefix_among_the_alive():
    t = AffinityTable(capacity=8)
    a, b = grid_prefix_keys(list(range(3 * G + 1)), G), grid_prefix_keys(list(range(G + 1)), G)
    assert len(a) == 3 and a[0] == b[0]  # a chain: a shared first block has the same key
    t.record(a, "r1")
    t.record(b, "r2")  # r2 read the first block more recently
    assert t.owner(a, {"r1", "r2"}) == "r1"  # but r1 holds the longer prefix
    assert t.owner(b, {"r1", "r2"}) == "r2"
    assert t.owner(a, {"r2"}) == "r2"  # r1 gone: the longest prefix an alive replica holds
    t.forget("r2")
    assert t.owner(b, {"r1", "r2"}) is None and t.owner(a, {"r1"}) == "r1"
    t.record(grid_prefix_keys(list(range(100, 100 + 9 * G + 1)), G), "r3")  # 9 keys: the oldest go
    assert len(t.owners) == 8 and t.owner(a, {"r1"}) is None


def test_prefer_keeps_affinity_until_the_owner_is_too_loaded():
    assert prefer("a", {"a": 5, "b": 1}, imbalance=4) == [["a"], ["b"]]
    assert prefer("a", {"a": 6, "b": 1}, imbalance=4) == [["a", "b"]]  # load decides
    assert prefer(None, {"a": 0, "b": 0}, imbalance=4) == [["a", "b"]]
    assert prefer("gone", {"a": 0}, imbalance=4) == [["a"]]


def _router(model=None) -> PrefixAffinityRouter:
    r = PrefixAffinityRouter.__new__(PrefixAffinityRouter)  # the keying part needs none of Serve's state
    r.initialize_state(model=model, grid=G)
    return r


def _pending(req, rid: str):
    return SimpleNamespace(args=[req], kwargs={}, metadata=SimpleNamespace(internal_request_id=rid))


def test_request_keys_from_token_ids_and_from_text(tmp_path):
    from .tiny_app import write_tiny_model

    r = _router(str(write_tiny_model(tmp_path / "tiny")))  # vocab 260: the ByteTokenizer
    ids = list(range(4, 4 + 2 * G + 3))
    assert r.prompt_keys(_pending(GenerateRequest("x", prompt_token_ids=ids), "1")) == grid_prefix_keys(ids, G)
    text = "a" * (2 * G + 3)
    want = grid_prefix_keys(r._encode(text), G)
    assert len(want) == 2 and r.prompt_keys(_pending(GenerateRequest("y", prompt=text), "2")) == want
    assert r.prompt_keys(_pending("not a generate request", "3")) == []  # health, model_info, ...
    assert r.prompt_keys(None) == []


# ---- on local Ray: hit rate with 2 pairs ------------------------------------------------------------------


def workload(seed: int = 0) -> list[list[int]]:
    """4 prefixes of 2 grid blocks, 4 requests each with its own 8-token suffix, interleaved."""
    rng = random.Random(seed)
    heads = [[rng.randrange(4, 260) for _ in range(2 * G)] for _ in range(4)]
    return [heads[i % 4] + [rng.randrange(4, 260) for _ in range(8)] for i in range(16)]


ENGINE = {"max_model_len": 512, "max_num_seqs": 8, "eager": True, "prefix_cache_grid": G}


def _single_replica_hit_rate(model_dir) -> float:
    from twotower.cluster.engine.loading import build_engine, load_model
    from twotower.cluster.engine.params import SamplingParams

    eng = build_engine(load_model(model_dir), EngineConfig(**ENGINE))
    reqs = [eng.generate([p], SamplingParams(mode="ar", max_tokens=2, ignore_eos=True))[0] for p in workload()]
    return sum(r.usage.cached_tokens for r in reqs) / sum(r.usage.prompt_tokens for r in reqs)


def _served_hit_rate(dashboard, model_dir, router: str, app: str, seed: int) -> float:
    """A fresh app (the config PUT replaces the last one, caches and all) of two pairs under `router`."""
    from twotower.cluster.serve.config import ServeConfig
    from twotower.cluster.serve.deploy import put_config, replica_counts, serve_deploy_config
    from twotower.protos import twotower_v1_pb2 as pb
    from twotower.protos import twotower_v1_pb2_grpc as pb_grpc

    from .tiny_app import free_port

    cfg = ServeConfig.from_dict({"model": str(model_dir), "app_name": app, "http_port": free_port(),
                                 "grpc_port": free_port(), "replicas": 2, "request_router": router,
                                 "engine": ENGINE, "pair": {"replica_cpus": 0.1, "micro_batches": 1}})  # fmt: skip
    put_config(dashboard, serve_deploy_config(cfg))
    wait_for(lambda: replica_counts(dashboard, app).get("TowerPair") == 2, 180, "two tower pairs")
    md = (("application", app),)
    with grpc.insecure_channel(f"127.0.0.1:{cfg.grpc_port}") as ch:
        stub = pb_grpc.TwoTowerStub(ch)
        wait_for(lambda: _ready(stub, md), 60, "the gRPC API")
        cached = prompt = 0
        for ids in workload(seed):  # one at a time: each request finds what the earlier ones left
            req = pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=ids), sampling=pb.SamplingParams(
                mode=pb.MODE_AR, max_tokens=2, ignore_eos=True))  # fmt: skip
            last = list(stub.Generate(req, metadata=md, timeout=60))[-1]
            cached, prompt = cached + last.usage.cached_tokens, prompt + last.usage.prompt_tokens
    return cached / prompt


def _ready(stub, md) -> bool:
    from twotower.protos import twotower_v1_pb2 as pb

    try:
        return stub.ModelInfo(pb.ModelInfoRequest(), metadata=md, timeout=5).prefix_cache.enabled
    except grpc.RpcError:
        return False


def test_two_pairs_with_prefix_affinity_hit_like_one(tmp_path):
    from ray import serve

    from .tiny_app import start_local_ray, write_tiny_model

    model_dir = write_tiny_model(tmp_path / "tiny")
    single = _single_replica_hit_rate(model_dir)
    dashboard, _ = start_local_ray()
    try:
        affinity = _served_hit_rate(dashboard, model_dir, "prefix_affinity", "affinity", seed=1)
        power_of_two = _served_hit_rate(dashboard, model_dir, "power_of_two", "power-of-two", seed=2)
    finally:
        serve.shutdown()
        ray.shutdown()
    print(f"token hit rate: one replica {single:.3f}, two with prefix affinity {affinity:.3f}, "
          f"two with power-of-two {power_of_two:.3f}")  # fmt: skip
    assert single == pytest.approx(12 * 2 * G / (16 * (2 * G + 8)))  # each prefix misses once
    assert abs(affinity - single) <= 0.10
    assert power_of_two <= single  # two caches never hit more than one that saw everything
