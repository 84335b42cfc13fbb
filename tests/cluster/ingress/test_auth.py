"""API keys on both APIs (ingress/auth.py): without a valid `Authorization: Bearer <key>` every call but
the health checks is refused (HTTP 401, gRPC UNAUTHENTICATED); with one it is served."""

from __future__ import annotations

import grpc
import pytest
from fastapi.testclient import TestClient
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.cluster.ingress.test_grpc_service import FakeServer as GrpcFake
from tests.cluster.ingress.test_openai_app import NAME
from tests.cluster.ingress.test_openai_app import FakeServer as HttpFake
from twotower.cluster.ingress import grpc_service as gi
from twotower.cluster.ingress.auth import ApiKeys
from twotower.cluster.ingress.openai_app import build_openai_app
from twotower.protos import pb2, pb2_grpc

from .grpc_harness import running_grpc

KEY, OTHER = "k" * 20 + "-first", "second-key-0123456789"


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    path = tmp_path_factory.mktemp("auth") / "keys"
    path.write_text(f"# serving keys\n{KEY}\n\n  {OTHER}  \n")
    return ApiKeys.from_file(path)


def test_key_file_and_matching(keys, tmp_path):
    assert keys.allows(f"Bearer {KEY}") and keys.allows(f"bearer {OTHER}")
    for bad in (None, "", KEY, f"Basic {KEY}", "Bearer ", f"Bearer {KEY}x", "Bearer wrong-key-but-long-enough"):
        assert not keys.allows(bad), bad
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(ValueError, match="api_keys_file: holds no key"):
        ApiKeys.from_file(tmp_path / "empty")
    with pytest.raises(ValueError, match="at least 16 characters"):
        ApiKeys(["short"])
    with pytest.raises(ValueError, match="cannot read"):
        ApiKeys.from_file(tmp_path / "missing")


def test_http_needs_a_key_except_for_health(keys):
    client = TestClient(build_openai_app(HttpFake(), NAME, api_keys=keys))
    body = {"model": NAME, "prompt": "hi"}
    for headers in ({}, {"Authorization": "Bearer wrong-key-but-long-enough"}, {"Authorization": KEY}):
        r = client.post("/v1/completions", json=body, headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["code"] == "invalid_api_key"
    assert client.get("/v1/models").status_code == 401
    assert client.get("/health").status_code == 200  # open: probes carry no key
    ok = client.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"]
    assert client.get("/v1/models", headers={"Authorization": f"Bearer {OTHER}"}).status_code == 200


def test_grpc_needs_a_key_except_for_health(keys):
    with running_grpc(lambda: gi.GrpcIngress(GrpcFake(), api_keys=keys)) as channel:
        stub = pb2_grpc.TwoTowerStub(channel)
        req = pb2.GenerateRequest(prompt_text="hello", sampling=pb2.SamplingParams(max_tokens=3))
        for md in ((), (("authorization", "Bearer nope-nope-nope-nope"),)):
            with pytest.raises(grpc.RpcError) as ei:
                list(stub.Generate(req, metadata=md, timeout=10))
            assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED and "API key" in ei.value.details()
        with pytest.raises(grpc.RpcError) as ei:
            stub.ModelInfo(pb2.ModelInfoRequest(), timeout=10)
        assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
        chunks = list(stub.Generate(req, metadata=(("authorization", f"Bearer {KEY}"),), timeout=10))
        assert chunks and chunks[-1].finished
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING  # open without a key
