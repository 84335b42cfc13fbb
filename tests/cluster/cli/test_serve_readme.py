"""`twotower serve` started the way the README starts it, with Ray's auth left at its default (token
auth on for the new local Ray): gRPC reflection and health, the openai client, and `twotower scale
--replicas 2` and back while a 2000-token stream runs. The stream completes with all its tokens, and
the replica ids show that no running replica was restarted by either scale."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

grpc = pytest.importorskip("grpc")
pytest.importorskip("ray")

from tests.waiting import wait_for as _wait  # noqa: E402
from twotower.cluster.serve.deploy import replica_counts, replica_ids  # noqa: E402
from twotower.protos import twotower_v1_pb2 as pb  # noqa: E402
from twotower.protos import twotower_v1_pb2_grpc as pb_grpc  # noqa: E402

TWOTOWER = [sys.executable, "-m", "twotower.cluster.cli"]
STREAM_TOKENS = 2000


def _free_ports(n: int) -> list[int]:
    """n distinct free ports (all held open while picking, so none is handed out twice)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _cli(*args: str) -> str:
    p = subprocess.run([*TWOTOWER, *args], capture_output=True, text=True, timeout=120, env=_env())
    assert p.returncode == 0, p.stderr
    return p.stdout


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    return {**env, "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    ports = dict(zip(("http", "grpc", "metrics", "dashboard"), _free_ports(4), strict=True))
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    # the README's command, with free ports (a shared CI machine) and eager steps (a quick CPU start)
    cmd = [*TWOTOWER, "serve", "--eager", "--http-port", str(ports["http"]), "--grpc-port", str(ports["grpc"]),
           "--metrics-port", str(ports["metrics"]), "--dashboard-port", str(ports["dashboard"])]  # fmt: skip
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=_env(), cwd=log.parent)
    try:
        _wait(lambda: proc.poll() is not None or "serving twotower" in log.read_text(), 300, "twotower serve")
        assert proc.poll() is None, log.read_text()[-4000:]
        yield {"ports": ports, "dashboard": f"http://127.0.0.1:{ports['dashboard']}", "log": log, "proc": proc}
    finally:
        proc.send_signal(signal.SIGTERM)  # as a script stops it
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError("twotower serve did not stop within 90 s of SIGTERM") from None


def test_reflection_health_and_the_openai_client(served):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    assert "Token authentication is enabled" in served["log"].read_text()  # Ray's default, left on
    assert (Path.home() / ".ray" / "auth_token").is_file() or os.environ.get("RAY_AUTH_TOKEN")
    with grpc.insecure_channel(f"127.0.0.1:{served['ports']['grpc']}") as ch:
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        resp = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                              timeout=30))  # fmt: skip
        names = {s.name for s in resp.list_services_response.service}
        assert {"twotower.v1.TwoTower", "grpc.health.v1.Health"} <= names
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=30)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{served['ports']['http']}/v1", api_key="unused")
    text = "".join(c.choices[0].text for c in client.completions.create(
        model="twotower", prompt="def parse_args(", max_tokens=24, stream=True,
        extra_body={"mode": "diffusion", "gamma": 0.8, "block_size": 16}))  # fmt: skip
    assert text.strip()
    shown = _cli("scale", "--dashboard", served["dashboard"])  # no flags: the settings and running counts
    assert "min_replicas=1 max_replicas=" in shown and "'TowerPair': 1" in shown


def test_a_long_stream_survives_scaling_up_and_down_without_restarts(served):
    dashboard = served["dashboard"]
    before = replica_ids(dashboard, "twotower")
    assert len(before["TowerPair"]) == 1 and len(before["Ingress"]) == 1
    tokens: list[int] = []
    done = threading.Event()
    errors: list[BaseException] = []

    def stream() -> None:
        req = pb.GenerateRequest(prompt_text="def parse_args(", sampling=pb.SamplingParams(
            mode=pb.MODE_MOCK_AR, max_tokens=STREAM_TOKENS, ignore_eos=True))  # fmt: skip
        try:
            with grpc.insecure_channel(f"127.0.0.1:{served['ports']['grpc']}") as ch:
                for chunk in pb_grpc.TwoTowerStub(ch).Generate(req, metadata=(("application", "twotower"),),
                                                               timeout=600):  # fmt: skip
                    tokens.extend(chunk.token_ids)
        except BaseException as e:  # reported by the test thread
            errors.append(e)
        finally:
            done.set()

    t = threading.Thread(target=stream, daemon=True)
    t.start()
    _wait(lambda: tokens or done.is_set(), 60, "the stream's first tokens")
    _cli("scale", "--dashboard", dashboard, "--replicas", "2")
    _wait(lambda: replica_counts(dashboard, "twotower").get("TowerPair") == 2, 180, "a second tower pair")
    up = replica_ids(dashboard, "twotower")
    assert before["TowerPair"] < up["TowerPair"] and up["Ingress"] == before["Ingress"], (before, up)
    assert not done.is_set(), f"the stream ended ({len(tokens)} tokens) before the scale-down: make it longer"
    at_down = len(tokens)
    _cli("scale", "--dashboard", dashboard, "--replicas", "1")
    _wait(lambda: replica_counts(dashboard, "twotower").get("TowerPair") == 1, 240, "scaling back to one pair")
    assert done.wait(300), f"the stream did not finish ({len(tokens)} tokens)"
    assert not errors, errors
    assert len(tokens) == STREAM_TOKENS and 0 < at_down < STREAM_TOKENS
    after = replica_ids(dashboard, "twotower")
    assert after["Ingress"] == before["Ingress"] and after["TowerPair"] < up["TowerPair"], (up, after)
    # the foreground process logs a throughput line from the scraped metrics while there is work
    def busy_line() -> str | None:
        lines = served["log"].read_text().splitlines()
        return next((ln for ln in lines if ln.startswith("throughput: ") and " 0.0 tokens/s" not in ln), None)

    line = _wait(busy_line, 60, "a throughput line")
    assert "running" in line and "tower pairs" in line


CHOICES = [  # a small local loglikelihood task: Python contexts and candidate continuations
    {"context": "def parse_args(", "choices": ["argv):", "self):", "1 +"], "label": 0},
    {"context": "import os\nimport ", "choices": ["sys", "if", "]]"], "label": 0},
    {"context": "for i in range(", "choices": ["10):", "x y", "return"], "label": 0},
]


@pytest.mark.slow
def test_lm_eval_loglikelihoods_equal_score_over_grpc(served, tmp_path):
    """lm-eval-harness's local-completions client (token-id prompts, echo, logprobs, the server's remote
    tokenizer) computes loglikelihoods through the HTTP API; Score over gRPC gives the same numbers.
    Needs `pip install -e '.[eval-harness]'`."""
    import json

    lm_eval = pytest.importorskip("lm_eval")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in CHOICES))
    (tmp_path / "tt_local.yaml").write_text(
        "task: tt_local\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        'target_delimiter: ""\nmetric_list:\n  - metric: acc\n')
    from lm_eval.tasks import TaskManager

    port = served["ports"]["http"]
    out = lm_eval.simple_evaluate(
        model="local-completions", tasks=["tt_local"], task_manager=TaskManager(include_path=str(tmp_path)),
        model_args=f"model=twotower,base_url=http://127.0.0.1:{port}/v1/completions,tokenizer_backend=remote,"
                   "tokenized_requests=True,num_concurrent=1,max_retries=1",
        log_samples=True, limit=None)  # fmt: skip
    samples = out["samples"]["tt_local"]
    assert len(samples) == len(CHOICES)
    with grpc.insecure_channel(f"127.0.0.1:{served['ports']['grpc']}") as ch:
        stub = pb_grpc.TwoTowerStub(ch)
        compared = 0
        for s in samples:
            doc = s["doc"]
            for choice, resp in zip(doc["choices"], s["resps"], strict=True):
                ll = resp[0][0]
                prompt, cont = _encode_pair(port, doc["context"], choice)
                reply = stub.Score(pb.ScoreRequest(prompt_token_ids=pb.TokenIds(ids=prompt),
                                                   continuation_token_ids=pb.TokenIds(ids=cont)),
                                   metadata=(("application", "twotower"),), timeout=60)  # fmt: skip
                assert abs(ll - reply.total_logprob) < 1e-4, (doc["context"], choice, ll, reply.total_logprob)
                compared += 1
    assert compared == sum(len(c["choices"]) for c in CHOICES)


def _encode_pair(port: int, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The token split lm-eval scores: trailing whitespace of the context moves to the continuation,
    and the continuation's tokens are those of context + continuation past the context's."""
    import json
    import urllib.request

    def tokenize(text: str) -> list[int]:
        body = json.dumps({"prompt": text, "add_special_tokens": False}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/tokenize", data=body,
                                     headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())["tokens"]

    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, head = tokenize(context + continuation), tokenize(context)
    return head, whole[len(head) :]



def test_every_listener_is_on_loopback_but_the_gloo_store(served):
    """A default `twotower serve`: its HTTP and gRPC ports, Ray's dashboard, GCS, raylet, workers, agents
    and Serve's replica servers listen on 127.0.0.1 only (the `ss -ltn` check, for this process tree).
    The one exception, named here: torch's TCPStore of the CPU tensor transport (gloo) in a tower actor,
    which binds every interface whatever its address (docs/tower_pair.md)."""
    from tests.listeners import listening

    socks = listening(served["proc"].pid)
    ports = {port for _, port, _ in socks}
    assert {served["ports"]["http"], served["ports"]["grpc"], served["ports"]["dashboard"]} <= ports, socks

    def cmdline(pid: int) -> str:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")

    outside = [(a, p, cmdline(pid)) for a, p, pid in socks if a != "127.0.0.1"]
    assert all("TowerWorker" in c for _, _, c in outside), outside
    assert len(outside) <= 1, outside  # the context tower hosts the pair's store
