"""The Serve app on local Ray (CPU): gRPC and HTTP streams equal the in-process engine's tokens, health,
reflection, model info, invalid requests, cancellation, metrics, autoscaling and manual REST scaling.
One Ray cluster (with the dashboard, which serves the REST API) for the whole module."""

from __future__ import annotations

import asyncio
import urllib.request

import pytest

ray = pytest.importorskip("ray")
grpc = pytest.importorskip("grpc")

from tests.waiting import wait_for as _wait  # noqa: E402
from twotower.cluster.engine.engine import Engine  # noqa: E402
from twotower.cluster.engine.executor import InProcessExecutor  # noqa: E402
from twotower.cluster.engine.params import ModelLimits, SamplingParams  # noqa: E402
from twotower.cluster.engine.tokenizer import ByteTokenizer  # noqa: E402
from twotower.cluster.serve.config import ServeConfig  # noqa: E402
from twotower.cluster.serve.deploy import (  # noqa: E402
    deployed_config,
    put_config,
    replica_counts,
    serve_deploy_config,
    set_replicas,
)
from twotower.protos import twotower_v1_pb2 as pb  # noqa: E402
from twotower.protos import twotower_v1_pb2_grpc as pb_grpc  # noqa: E402
from twotower.towers.checkpoint import load_tower  # noqa: E402

from .certs import write_test_certs  # noqa: E402
from .tiny_app import free_port, start_local_ray, write_tiny_model  # noqa: E402

APP = "twotower"
KEY = "serve-test-key-0123456789"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="module")
def cluster(model_dir, tmp_path_factory):
    secrets = tmp_path_factory.mktemp("secrets")
    keys = secrets / "api_keys"
    keys.write_text(KEY + "\n")
    ca, cert, key = write_test_certs(secrets)
    dashboard, metrics_port = start_local_ray()
    cfg = ServeConfig.from_dict({
        "model": str(model_dir), "app_name": APP, "http_port": free_port(), "grpc_port": free_port(),
        "engine": {"max_model_len": 512, "max_num_seqs": 16, "eager": True}, "api_keys_file": str(keys),
        "tls_certfile": str(cert), "tls_keyfile": str(key),
        "pair": {"replica_cpus": 0.1, "micro_batches": 1},
        "autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
                        "upscale_delay_s": 1, "downscale_delay_s": 3, "look_back_period_s": 2},
    })  # fmt: skip
    put_config(dashboard, serve_deploy_config(cfg))
    _wait(lambda: replica_counts(dashboard, APP).get("TowerPair") == 1, 180, "the app to start")
    # gRPC over TLS with the app's certificate (the Ingress replica's own listener)
    channel = grpc.secure_channel(f"127.0.0.1:{cfg.grpc_port}", grpc.ssl_channel_credentials(ca.read_bytes()))
    _wait(lambda: _health(channel) == 1, 60, "gRPC health SERVING")
    yield {"cfg": cfg, "dashboard": dashboard, "channel": channel, "metrics_port": metrics_port, "ca": ca}
    channel.close()
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def _health(channel) -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
    except grpc.RpcError:
        return -1


def _local_tokens(model_dir, prompt: str, sp: SamplingParams) -> list[int]:
    ex = InProcessExecutor(load_tower(model_dir, "context"), load_tower(model_dir, "denoiser"))
    eng = Engine(ex, ModelLimits(260, 512), eos_token_ids=(2,), tokenizer=ByteTokenizer(260))
    return eng.generate([prompt], sp)[0].output_ids


MD = (("application", APP), ("authorization", f"Bearer {KEY}"))  # the app runs with API keys on


def _openai(cluster, key: str):
    """An openai client over HTTPS (the app serves TLS with a test CA's certificate for 127.0.0.1)."""
    import openai

    return openai.OpenAI(base_url=f"https://127.0.0.1:{cluster['cfg'].http_port}/v1", api_key=key, max_retries=0,
                         http_client=openai.DefaultHttpxClient(verify=str(cluster["ca"])))  # fmt: skip


def test_grpc_stream_equals_in_process_engine(cluster, model_dir):
    stub = pb_grpc.TwoTowerStub(cluster["channel"])
    for mode, pmode in (("diffusion", pb.MODE_DIFFUSION), ("ar", pb.MODE_AR), ("lossless", pb.MODE_LOSSLESS)):
        sp = SamplingParams(mode=mode, max_tokens=24, block_size=8, gamma=0.5, ignore_eos=True)
        req = pb.GenerateRequest(prompt_text="def parse_args(", sampling=pb.SamplingParams(
            mode=pmode, max_tokens=24, block_size=8, gamma=0.5, ignore_eos=True))  # fmt: skip
        chunks = list(stub.Generate(req, metadata=MD, timeout=60))
        assert chunks[-1].finished and chunks[-1].usage.completion_tokens == 24
        assert [t for c in chunks for t in c.token_ids] == _local_tokens(model_dir, "def parse_args(", sp), mode


def test_http_stream_equals_in_process_engine(cluster, model_dir):
    import openai

    client = _openai(cluster, KEY)
    sp = SamplingParams(mode="diffusion", max_tokens=24, block_size=8, gamma=0.5, ignore_eos=True)
    want = ByteTokenizer(260).decode(_local_tokens(model_dir, "hello", sp))
    stream = client.completions.create(model="twotower", prompt="hello", max_tokens=24, stream=True,
                                       extra_body={"mode": "diffusion", "block_size": 8, "gamma": 0.5,
                                                   "ignore_eos": True})  # fmt: skip
    assert "".join(c.choices[0].text for c in stream) == want
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="twotower", prompt="hello", max_tokens=4, extra_body={"gamma": 1.5})
    assert "gamma" in str(e.value)


def test_health_reflection_model_info_and_invalid_requests(cluster):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    ch = cluster["channel"]
    assert _health(ch) == 1  # SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(ch)
    resp = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                          metadata=MD, timeout=10))  # fmt: skip
    assert "twotower.v1.TwoTower" in {s.name for s in resp.list_services_response.service}
    stub = pb_grpc.TwoTowerStub(ch)
    info = stub.ModelInfo(pb.ModelInfoRequest(), metadata=MD, timeout=30)
    assert info.vocab_size == 260 and pb.MODE_DIFFUSION in info.modes and info.max_model_len == 512
    cache = info.prefix_cache  # the EngineConfig defaults: on, 256-token grid, 1 GiB
    assert (cache.enabled, cache.grid, cache.budget_bytes) == (True, 256, 1 << 30)
    bad = pb.GenerateRequest(prompt_text="x", sampling=pb.SamplingParams(block_size=0))
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(bad, metadata=MD, timeout=30))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "block_size" in e.value.details()
    with grpc.insecure_channel(f"127.0.0.1:{cluster['cfg'].grpc_port}") as plain, pytest.raises(grpc.RpcError) as e:
        stub_plain = pb_grpc.TwoTowerStub(plain)  # TLS only: a plaintext client gets no answer
        stub_plain.ModelInfo(pb.ModelInfoRequest(), metadata=MD, timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(grpc.RpcError) as e:  # a call without the key is refused
        stub.ModelInfo(pb.ModelInfoRequest(), metadata=(("application", APP),), timeout=30)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    import openai

    with pytest.raises(openai.AuthenticationError):
        _openai(cluster, "not-a-key").completions.create(model="twotower", prompt="hi", max_tokens=2)
    with pytest.raises(openai.APIConnectionError):  # HTTPS only: a plaintext client gets no answer
        openai.OpenAI(base_url=f"http://127.0.0.1:{cluster['cfg'].http_port}/v1", api_key=KEY,
                      max_retries=0).completions.create(model="twotower", prompt="hi", max_tokens=2)


def _pair_stats(cluster) -> dict:
    from ray import serve

    h = serve.get_deployment_handle("TowerPair", app_name=APP)
    return h.stats.remote().result(timeout_s=30)


def test_cancelled_stream_frees_its_slot(cluster):
    stub = pb_grpc.TwoTowerStub(cluster["channel"])
    req = pb.GenerateRequest(prompt_text="abc", sampling=pb.SamplingParams(
        mode=pb.MODE_DIFFUSION, max_tokens=400, block_size=4, gamma=0.99, ignore_eos=True))  # fmt: skip
    call = stub.Generate(req, metadata=MD, timeout=120)
    next(call)  # generating
    assert _pair_stats(cluster)["running"] >= 1
    call.cancel()
    _wait(lambda: _pair_stats(cluster)["running"] == 0, 30, "the cancelled request to leave the engine")


def _sample(text: str, name: str) -> float | None:
    """The value of metric `name`'s first sample in a Prometheus exposition."""
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_metrics_node_port_and_http_route_show_every_family(cluster):
    import ssl

    from twotower.cluster.serve.metrics import EVENT_ONLY, METRICS, SCRAPED_PREFIX

    stub = pb_grpc.TwoTowerStub(cluster["channel"])
    list(stub.Generate(pb.GenerateRequest(prompt_text="metrics", sampling=pb.SamplingParams(
        mode=pb.MODE_DIFFUSION, max_tokens=16, block_size=8, ignore_eos=True)), metadata=MD, timeout=60))  # fmt: skip
    with pytest.raises(grpc.RpcError):  # an error answered, for twotower_errors_total
        list(stub.Generate(pb.GenerateRequest(prompt_text="x", sampling=pb.SamplingParams(block_size=10**6)),
                           metadata=MD, timeout=30))  # fmt: skip
    # what the docs list: every family, as scraped (a migration happens in test_migration.py only)
    names = [SCRAPED_PREFIX + n for n in METRICS if n not in EVENT_ONLY]

    def node_port():
        text = urllib.request.urlopen(f"http://127.0.0.1:{cluster['metrics_port']}/metrics", timeout=10).read().decode()
        return all(f"# TYPE {n} " in text for n in names) and text

    _wait(node_port, 60, "the metrics to be exported", every=2)
    tls = ssl.create_default_context(cafile=str(cluster["ca"]))
    url = f"https://127.0.0.1:{cluster['cfg'].http_port}/metrics"

    def http_route():
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {KEY}"})
        with urllib.request.urlopen(req, timeout=10, context=tls) as r:
            text = r.read().decode()
        # idle again: the gauges say so
        idle = _sample(text, "ray_twotower_active_requests") == 0 and _sample(text, "ray_twotower_tokens_per_s") == 0
        return all(f"# TYPE {n} " in text for n in names) and idle and text

    text = _wait(http_route, 60, "/metrics on the HTTP port", every=2)
    assert text.count("# TYPE ray_twotower_active_requests ") == 1  # one family header, merged over nodes
    assert 'code="INVALID_ARGUMENT"' in text and "ray_serve_deployment_replica_healthy" in text


def test_autoscaling_grows_under_load_and_shrinks_back(cluster):
    """Four streams kept in flight (each reissued when it ends: one 500-token stream lasts only ~4 s, shorter
    than Serve's metric push interval) until a second pair runs; then no load until it is gone."""
    import threading

    dashboard = cluster["dashboard"]
    stub = pb_grpc.TwoTowerStub(cluster["channel"])
    req = pb.GenerateRequest(prompt_text="load", sampling=pb.SamplingParams(
        mode=pb.MODE_DIFFUSION, max_tokens=500, block_size=4, gamma=0.99, ignore_eos=True))  # fmt: skip
    stop, finished = threading.Event(), []

    def keep_busy():
        while not stop.is_set():
            call = stub.Generate(req, metadata=MD, timeout=300)
            for chunk in call:
                if stop.is_set():
                    call.cancel()
                    break
                if chunk.finished:
                    finished.append(chunk.usage.completion_tokens)

    streams = [threading.Thread(target=keep_busy, daemon=True) for _ in range(4)]
    for t in streams:
        t.start()
    try:
        _wait(lambda: replica_counts(dashboard, APP).get("TowerPair") == 2, 120, "a second tower pair")
    finally:
        stop.set()
        for t in streams:
            t.join(60)
    assert all(n == 500 for n in finished)  # the streams that ended while scaling up were whole
    _wait(lambda: replica_counts(dashboard, APP).get("TowerPair") == 1, 120, "scaling back to one pair")


def test_manual_scale_through_rest(cluster):
    dashboard = cluster["dashboard"]
    put_config(dashboard, set_replicas(deployed_config(dashboard), APP, replicas=2))
    _wait(lambda: replica_counts(dashboard, APP).get("TowerPair") == 2, 120, "two pairs after a manual scale")
    put_config(dashboard, set_replicas(deployed_config(dashboard), APP, replicas=1))
    _wait(lambda: replica_counts(dashboard, APP).get("TowerPair") == 1, 120, "one pair after scaling back")
    asyncio.run(asyncio.sleep(0))
