"""The gRPC ingress without Ray: a fake ServerClient behind a plain grpc.aio server, called by a real client."""

from __future__ import annotations

import asyncio
import dataclasses
import pickle
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from twotower.cluster.engine.params import ModelLimits, SamplingParams
from twotower.cluster.ingress import grpc_convert as conv
from twotower.cluster.ingress import grpc_service as gi
from twotower.cluster.ingress.api_types import (
    SAMPLING_FIELDS,
    GenerateDelta,
    GenerateRequest,
    InvalidRequest,
    ModelInfo,
    PrefixCacheInfo,
    ScoreRequest,
    ScoreResult,
)
from twotower.protos import pb2, pb2_grpc

from .grpc_harness import running_grpc

LIMITS = ModelLimits(vocab_size=100, max_model_len=512, max_block_size=16, modes=("diffusion", "ar"))


class FakeServer:
    """A ServerClient: streams blocks of two tokens; special prompts stall, fail or are unreachable."""

    def __init__(self):
        self.requests: dict[str, GenerateRequest] = {}
        self.aborted: list[str] = []
        self.cond = threading.Condition()
        self.healthy = True

    async def generate(self, req: GenerateRequest):
        self.requests[req.request_id] = req
        prompt = req.prompt_input()  # ValueError naming "prompt"
        ids = [ord(c) % LIMITS.vocab_size for c in prompt] if isinstance(prompt, str) else prompt
        try:
            params = req.params().validate(LIMITS, len(ids))
        except ValueError as e:
            raise InvalidRequest(str(e)) from None
        if prompt == "down":
            raise ConnectionError("tower pair 0 is restarting")
        done = 0
        while True:
            n = min(2, params.max_tokens - done)
            done += n
            finished = done >= params.max_tokens
            yield GenerateDelta(req.request_id, list(range(done - n, done)), "ab"[:n], finished,
                                "length" if finished else None, len(ids), done, done, 1,
                                [-0.5] * n if params.logprobs else None, 7)  # fmt: skip
            if prompt == "slow":
                await asyncio.sleep(30)
            if prompt == "boom":
                raise RuntimeError("kaboom")
            if finished:
                return

    async def score(self, req: ScoreRequest) -> ScoreResult:
        cont = req.continuation_token_ids or [ord(c) for c in req.continuation]
        return ScoreResult(cont, [-1.0] * len(cont), -1.0 * len(cont), len(req.prompt or req.prompt_token_ids))

    async def model_info(self) -> ModelInfo:
        if not self.healthy:
            raise ConnectionError("no tower pair ready")
        defaults = {f.name: getattr(SamplingParams(), f.name) for f in dataclasses.fields(SamplingParams)}
        return ModelInfo("tiny", "/ckpt/tiny", list(LIMITS.modes), LIMITS.vocab_size, LIMITS.max_model_len,
                         LIMITS.max_block_size, "M*-", 32, defaults, 99, [0],
                         PrefixCacheInfo(True, 256, 1 << 30))  # fmt: skip

    async def health(self) -> bool:
        return self.healthy

    async def abort(self, request_id: str) -> None:
        with self.cond:
            self.aborted.append(request_id)
            self.cond.notify_all()

    def wait_aborted(self, request_id: str, timeout: float = 5.0) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: request_id in self.aborted, timeout)


@pytest.fixture(scope="module")
def served():
    fake = FakeServer()
    with running_grpc(lambda: gi.GrpcIngress(fake)) as channel:
        yield fake, channel


def stub(served):
    return pb2_grpc.TwoTowerStub(served[1])


def rpc_error(fn) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as ei:
        fn()
    return ei.value


def gen(served, timeout: float = 10, **kw) -> list[pb2.GenerateChunk]:
    return list(stub(served).Generate(pb2.GenerateRequest(**kw), timeout=timeout))


def test_generate_streams_chunks(served):
    sampling = pb2.SamplingParams(max_tokens=5, logprobs=True, temperature=0.0, mode=pb2.MODE_DIFFUSION)
    chunks = gen(served, prompt_text="hello", request_id="r-stream", sampling=sampling)
    assert [list(c.token_ids) for c in chunks] == [[0, 1], [2, 3], [4]]
    assert [c.finished for c in chunks] == [False, False, True]
    last = chunks[-1]
    assert last.finish_reason == pb2.FINISH_REASON_LENGTH and chunks[0].finish_reason == pb2.FINISH_REASON_UNSPECIFIED
    assert all(c.request_id == "r-stream" for c in chunks) and last.seed == 7 and list(last.logprobs) == [-0.5]
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.context_forwards) == (5, 5, 1)
    assert last.usage.tokens_per_forward == pytest.approx(5 / 6)
    # absent fields stay absent (server default); explicit zeros arrive
    req = served[0].requests["r-stream"]
    assert req.sampling == {"mode": "diffusion", "max_tokens": 5, "logprobs": True, "temperature": 0.0}
    assert req.prompt == "hello" and req.prompt_token_ids is None
    assert "r-stream" not in served[0].aborted  # finished normally: nothing to abort


def test_token_prompt_generated_request_id_and_deadlines(served):
    chunks = gen(served, prompt_token_ids=pb2.TokenIds(ids=[5, 6, 7]), sampling=pb2.SamplingParams(max_tokens=2))
    rid = chunks[0].request_id
    assert len(rid) == 32 and chunks[-1].finished  # a uuid4 hex
    req = served[0].requests[rid]
    assert req.prompt_token_ids == [5, 6, 7] and req.prompt is None
    assert 0 < req.deadline_s <= 10.5  # the gRPC deadline, as seconds left (gRPC rounds it up a little)
    gen(served, timeout=10, prompt_text="x", request_id="r-dl", deadline_s=2.5)
    assert served[0].requests["r-dl"].deadline_s == 2.5  # the earlier of the two
    gen(served, timeout=None, prompt_text="x", request_id="r-nodl")
    assert served[0].requests["r-nodl"].deadline_s is None


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"prompt_text": "hi", "sampling": pb2.SamplingParams(gamma=1.5)}, "SamplingParams.gamma"),
        ({"prompt_text": "hi", "sampling": pb2.SamplingParams(block_size=0)}, "SamplingParams.block_size"),
        ({"prompt_text": "hi", "sampling": pb2.SamplingParams(max_tokens=-1)}, "SamplingParams.max_tokens"),
        ({"prompt_text": "hi", "sampling": pb2.SamplingParams(mode=pb2.MODE_LOSSLESS)}, "SamplingParams.mode"),
        ({"prompt_text": "hi", "sampling": pb2.SamplingParams(mode=99)}, "SamplingParams.mode: unknown value 99"),
        ({}, "prompt: give exactly one of prompt_text and prompt_token_ids"),
        ({"prompt_token_ids": pb2.TokenIds()}, "prompt: must contain at least one token"),
        ({"prompt_text": "hi", "deadline_s": -1.0}, "deadline_s"),
    ],
)
def test_bad_requests_are_invalid_argument_naming_the_field(served, kw, field):
    err = rpc_error(lambda: gen(served, **kw))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.details()


def test_both_prompt_forms_cannot_be_sent():
    # a oneof: setting one form clears the other, so "both" never reaches the server
    msg = pb2.GenerateRequest(prompt_text="hi")
    msg.prompt_token_ids.ids.append(3)
    assert msg.WhichOneof("prompt") == "prompt_token_ids" and not msg.HasField("prompt_text")


def test_server_failures(served):
    err = rpc_error(lambda: gen(served, prompt_text="down"))
    assert err.code() == grpc.StatusCode.UNAVAILABLE and "error id" in err.details()
    assert "restarting" not in err.details()  # the cause is logged, not sent
    assert ("grpc-retry-pushback-ms", "1000") in tuple(err.trailing_metadata())  # a retry hint
    call = stub(served).Generate(pb2.GenerateRequest(prompt_text="boom", request_id="r-boom"), timeout=10)
    first = next(call)
    assert list(first.token_ids) == [0, 1]  # what was generated before the failure still arrives
    err = rpc_error(lambda: next(call))
    assert err.code() == grpc.StatusCode.INTERNAL and "error id" in err.details() and "kaboom" not in err.details()


def test_client_cancellation_aborts_the_request(served):
    fake = served[0]
    call = stub(served).Generate(pb2.GenerateRequest(prompt_text="slow", request_id="r-cancel"), timeout=20)
    assert next(call).request_id == "r-cancel"
    call.cancel()
    assert fake.wait_aborted("r-cancel")
    # the gRPC deadline passing cancels the handler the same way
    t0 = time.monotonic()
    call = stub(served).Generate(pb2.GenerateRequest(prompt_text="slow", request_id="r-deadline"), timeout=0.5)
    err = rpc_error(lambda: list(call))
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - t0 < 5
    assert fake.wait_aborted("r-deadline")


def test_health_check_follows_the_server(served):
    fake, channel = served
    health = health_pb2_grpc.HealthStub(channel)
    serving = health_pb2.HealthCheckResponse.SERVING
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == serving
    assert health.Check(health_pb2.HealthCheckRequest(service="twotower.v1.TwoTower"), timeout=5).status == serving
    fake.healthy = False
    try:
        status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        fake.healthy = True
    err = rpc_error(lambda: health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5))
    assert err.code() == grpc.StatusCode.NOT_FOUND


def test_health_without_a_health_method_uses_model_info():
    class NoHealth(FakeServer):
        health = None

    fake = NoHealth()
    check = gi.GrpcIngress(fake).Check
    assert asyncio.run(check(health_pb2.HealthCheckRequest())).status == health_pb2.HealthCheckResponse.SERVING
    fake.healthy = False  # model_info now raises
    assert asyncio.run(check(health_pb2.HealthCheckRequest())).status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_reflection_lists_the_service(served):
    refl = reflection_pb2_grpc.ServerReflectionStub(served[1])
    replies = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in replies[0].list_services_response.service}
    assert {"twotower.v1.TwoTower", "grpc.health.v1.Health"} <= names


def test_model_info_and_score(served):
    info = stub(served).ModelInfo(pb2.ModelInfoRequest(), timeout=5)
    got = (info.model, info.path, info.vocab_size, info.max_block_size, info.pattern)
    assert got == ("tiny", "/ckpt/tiny", 100, 16, "M*-")
    assert list(info.modes) == [pb2.MODE_DIFFUSION, pb2.MODE_AR] and list(info.eos_token_ids) == [0]
    d = info.defaults
    assert (d.mode, d.block_size, d.gamma, d.max_tokens) == (pb2.MODE_DIFFUSION, 16, 0.8, 128)
    assert d.HasField("temperature") and not d.HasField("seed")  # seed defaults to None: absent
    c = info.prefix_cache
    assert (c.enabled, c.grid, c.budget_bytes) == (True, 256, 1 << 30)

    reply = stub(served).Score(pb2.ScoreRequest(prompt_text="ab", continuation_token_ids=pb2.TokenIds(ids=[4, 5])))
    assert list(reply.token_ids) == [4, 5] and list(reply.logprobs) == [-1.0, -1.0]
    assert (reply.total_logprob, reply.prompt_tokens) == (-2.0, 2)
    err = rpc_error(lambda: stub(served).Score(pb2.ScoreRequest(prompt_text="ab"), timeout=5))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "continuation" in err.details()


def test_every_sampling_field_round_trips():
    proto_fields = set(pb2.SamplingParams.DESCRIPTOR.fields_by_name)
    assert proto_fields == set(SAMPLING_FIELDS)
    values = {"mode": "lossless", "max_tokens": 9, "temperature": 0.0, "top_k": 0, "top_p": 0.5, "seed": 2**63 - 1,
              "stop_token_ids": [1, 2], "stop": ["\n"], "ignore_eos": False, "block_size": 4, "steps_per_block": 3,
              "gamma": 0.25, "logprobs": False}  # fmt: skip
    assert set(values) == set(SAMPLING_FIELDS)
    msg = conv.sampling_to_proto(values)
    assert conv.sampling_from_proto(msg) == values  # explicit zeros / False survive as "set"
    SamplingParams(**conv.sampling_from_proto(msg)).validate(ModelLimits(vocab_size=100, max_model_len=64))
    assert conv.sampling_from_proto(pb2.SamplingParams()) == {}


class ServeLikeContext:
    """What RayServegRPCContext offers: set_code / set_details, no abort, no time_remaining."""

    def __init__(self):
        self.code = self.details = None

    def set_code(self, code):
        self.code = code

    def set_details(self, details):
        self.details = details


def test_serve_style_context_gets_the_code_and_an_exception():
    async def drain(req):
        return [c async for c in gi.GrpcIngress(FakeServer()).Generate(req, ctx)]

    ctx = ServeLikeContext()
    with pytest.raises(conv.GrpcStatus) as ei:
        asyncio.run(drain(pb2.GenerateRequest(prompt_text="hi", sampling=pb2.SamplingParams(gamma=2.0))))
    assert ctx.code == ei.value.code == grpc.StatusCode.INVALID_ARGUMENT
    again = pickle.loads(pickle.dumps(ei.value))  # Serve pickles it on the way to the proxy
    assert (again.code, again.details) == (ei.value.code, ei.value.details)
    assert ctx.details.startswith("SamplingParams.gamma:")
    ctx = ServeLikeContext()
    chunks = asyncio.run(drain(pb2.GenerateRequest(prompt_text="hi")))
    assert chunks[-1].finished and ctx.code is None  # success leaves the code alone


def test_default_deadline_applies_when_the_request_has_none():
    fake = FakeServer()
    ingress = gi.GrpcIngress(fake, default_deadline_s=30.0)

    async def run(**kw):
        return [c async for c in ingress.Generate(pb2.GenerateRequest(prompt_text="hi", **kw), ServeLikeContext())]

    asyncio.run(run(request_id="a"))
    asyncio.run(run(request_id="b", deadline_s=3.0))
    assert (fake.requests["a"].deadline_s, fake.requests["b"].deadline_s) == (30.0, 3.0)
