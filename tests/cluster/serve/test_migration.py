"""A tower actor killed mid-stream, with 2 fixed replicas on local Ray (CPU): with migration on (the app's
gRPC API, migration_limit 1) every in-flight stream completes with exactly the greedy tokens of the
in-process engine; with migration off (a HandleClient with limit 0 over the deployment handle) the
streams of the killed pair end UNAVAILABLE and the others complete. Either way the dead replica is
replaced and the app returns to 2 pairs."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
import urllib.request

import pytest

ray = pytest.importorskip("ray")
grpc = pytest.importorskip("grpc")

from tests.waiting import wait_for  # noqa: E402
from twotower.cluster.engine.engine import Engine  # noqa: E402
from twotower.cluster.engine.executor import InProcessExecutor  # noqa: E402
from twotower.cluster.engine.params import ModelLimits, SamplingParams  # noqa: E402
from twotower.cluster.engine.tokenizer import ByteTokenizer  # noqa: E402
from twotower.cluster.ingress.api_types import GenerateRequest  # noqa: E402
from twotower.cluster.ingress.errors import is_unavailable  # noqa: E402
from twotower.cluster.serve.config import ServeConfig  # noqa: E402
from twotower.cluster.serve.deploy import put_config, replica_counts, serve_deploy_config  # noqa: E402
from twotower.cluster.serve.handle_client import HandleClient  # noqa: E402
from twotower.protos import twotower_v1_pb2 as pb  # noqa: E402
from twotower.protos import twotower_v1_pb2_grpc as pb_grpc  # noqa: E402
from twotower.towers.checkpoint import load_tower  # noqa: E402

from .tiny_app import free_port, start_local_ray, write_tiny_model  # noqa: E402

APP = "twotower"
N_STREAMS = 8
# greedy streams of every mode; long enough that a kill lands mid-stream
SPECS = [dict(mode="ar", max_tokens=160), dict(mode="diffusion", block_size=4, max_tokens=96),
         dict(mode="lossless", block_size=4, max_tokens=160), dict(mode="mock_ar", max_tokens=96)]  # fmt: skip
PB_MODE = {"ar": pb.MODE_AR, "diffusion": pb.MODE_DIFFUSION, "lossless": pb.MODE_LOSSLESS, "mock_ar": pb.MODE_MOCK_AR}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("migrate") / "tiny")


def _prompt(i: int) -> str:
    return f"stream {i}: def f(x):"


@pytest.fixture(scope="module")
def reference(model_dir) -> list[list[int]]:
    ex = InProcessExecutor(load_tower(model_dir, "context"), load_tower(model_dir, "denoiser"))
    eng = Engine(ex, ModelLimits(260, 512), eos_token_ids=(2,), tokenizer=ByteTokenizer(260))
    params = [SamplingParams(ignore_eos=True, **SPECS[i % len(SPECS)]) for i in range(N_STREAMS)]
    return [r.output_ids for r in eng.generate([_prompt(i) for i in range(N_STREAMS)], params)]


@pytest.fixture(scope="module")
def cluster(model_dir):
    dashboard, metrics_port = start_local_ray()
    cfg = ServeConfig.from_dict({
        "model": str(model_dir), "app_name": APP, "http_port": free_port(), "grpc_port": free_port(),
        "engine": {"max_model_len": 512, "max_num_seqs": 16, "eager": True}, "replicas": 2,
        "pair": {"replica_cpus": 0.1, "micro_batches": 1},
    })  # fmt: skip
    put_config(dashboard, serve_deploy_config(cfg))
    wait_for(lambda: replica_counts(dashboard, APP).get("TowerPair") == 2, 240, "2 tower pairs")
    channel = grpc.insecure_channel(f"127.0.0.1:{cfg.grpc_port}")
    yield {"cfg": cfg, "dashboard": dashboard, "channel": channel, "metrics_port": metrics_port}
    channel.close()
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def _tower_pids(cls: str) -> list[int]:
    from ray.util.state import list_actors

    return [a.pid for a in list_actors(filters=[("class_name", "=", cls), ("state", "=", "ALIVE")])]


def _back_to_two(cluster, old_pids: set[int], cls: str, t_kill: float) -> float:
    """Seconds from the kill until 2 pairs run again, a new one in place of the killed one."""

    def ready():
        pids = set(_tower_pids(cls))
        return replica_counts(cluster["dashboard"], APP).get("TowerPair") == 2 and len(pids) == 2 and pids != old_pids

    wait_for(ready, 240, "the killed pair to be replaced", every=0.2)
    return time.monotonic() - t_kill


def _kill_one(cls: str) -> tuple[set[int], float]:
    pids = _tower_pids(cls)
    assert len(pids) == 2, pids
    os.kill(pids[0], signal.SIGKILL)
    return set(pids), time.monotonic()


def test_migration_off_ends_the_killed_pairs_streams_unavailable(cluster, reference):
    from ray import serve

    handle = serve.get_deployment_handle("TowerPair", app_name=APP)
    client = HandleClient(handle, migration_limit=0)
    started = [asyncio.Event() for _ in range(N_STREAMS)]

    async def one(i):
        req = GenerateRequest(f"off-{i}", prompt=_prompt(i), sampling={"ignore_eos": True, **SPECS[i % len(SPECS)]})
        ids = []
        try:
            async for d in client.generate(req):
                ids += d.token_ids
                started[i].set()
            return ids
        except Exception as e:
            started[i].set()
            return e

    async def main():
        tasks = [asyncio.create_task(one(i)) for i in range(N_STREAMS)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 120)
        killed = await asyncio.to_thread(_kill_one, "ContextTowerWorker")
        return await asyncio.gather(*tasks), killed

    results, (pids, t_kill) = asyncio.run(main())
    failed = [r for r in results if isinstance(r, Exception)]
    assert failed and all(is_unavailable(e) for e in failed), failed  # the killed pair had streams
    done = [(i, r) for i, r in enumerate(results) if not isinstance(r, Exception)]
    assert done and all(r == reference[i] for i, r in done)  # the other pair's streams are untouched
    assert client.migrations == 0
    back = _back_to_two(cluster, pids, "ContextTowerWorker", t_kill)
    print(f"{len(failed)} streams ended UNAVAILABLE; 2 pairs again {back:.1f} s after the kill")


def test_migration_on_completes_every_stream_with_its_tokens(cluster, reference):
    stub = pb_grpc.TwoTowerStub(cluster["channel"])
    results: list = [None] * N_STREAMS
    started = [threading.Event() for _ in range(N_STREAMS)]

    def one(i):
        spec = SPECS[i % len(SPECS)]
        sp = pb.SamplingParams(**{**spec, "mode": PB_MODE[spec["mode"]]}, ignore_eos=True)
        ids = []
        try:
            for d in stub.Generate(pb.GenerateRequest(prompt_text=_prompt(i), sampling=sp),
                                   metadata=(("application", APP),), timeout=180):  # fmt: skip
                ids += d.token_ids
                started[i].set()
            results[i] = ids
        except grpc.RpcError as e:
            results[i] = e
        started[i].set()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(N_STREAMS)]
    for t in threads:
        t.start()
    assert all(e.wait(120) for e in started)
    pids, t_kill = _kill_one("DenoiserTowerWorker")
    for t in threads:
        t.join(240)
    errors = [(i, r.code(), r.details()) for i, r in enumerate(results) if isinstance(r, grpc.RpcError)]
    assert not errors, errors
    wrong = [(i, SPECS[i % len(SPECS)]["mode"]) for i, r in enumerate(results) if r != reference[i]]
    assert not wrong, wrong  # every stream, moved or not, has exactly its greedy tokens

    def migrations():
        url = f"http://127.0.0.1:{cluster['metrics_port']}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        vals = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line.startswith("ray_twotower_migrations_total{")]  # fmt: skip
        return sum(vals) if vals else None

    n = wait_for(migrations, 60, "the migrations counter", every=2)
    assert n >= 1  # streams of the killed pair moved; every one of them finished above
    back = _back_to_two(cluster, pids, "DenoiserTowerWorker", t_kill)
    print(f"{n:.0f} streams moved; 2 pairs again {back:.1f} s after the kill")

