"""The OpenAI-compatible HTTP ingress (twotower/cluster/openai_api.py) against a fake ServerClient, without Ray:
JSON <-> api_types conversion, SSE streaming, errors naming the field, aborts when the client goes away,
and the official `openai` client against a real uvicorn server."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest
import uvicorn
from fastapi.testclient import TestClient
from starlette.requests import ClientDisconnect

from twotower.cluster.engine.params import MODES
from twotower.cluster.ingress.api_types import (
    SAMPLING_FIELDS,
    GenerateDelta,
    GenerateRequest,
    InvalidRequest,
    ModelInfo,
    ScoreResult,
)
from twotower.cluster.ingress.openai_app import build_openai_app
from twotower.cluster.ingress.openai_protocol import KNOWN_FIELDS

NAME = "twotower-test"
DEFAULTS = {"mode": "diffusion", "max_tokens": 16, "block_size": 16, "gamma": 0.8}
INFO = ModelInfo(NAME, "/models/tt", list(MODES), vocab_size=260, max_model_len=64, max_block_size=32,
                 pattern="M*M-", hidden_size=64, defaults=DEFAULTS, mask_token_id=3, eos_token_ids=[0])  # fmt: skip


class FakeServer:
    """Streams `chunks` as deltas (token ids = the characters' codes). Knobs: `refuse` (InvalidRequest
    before the first delta), `fail_after` (raise after that many deltas), `error_delta` (finish with
    finish_reason "error"), `hang` (after the first delta, wait until aborted)."""

    def __init__(self, chunks=("Hel", "lo", "!"), finish="length", refuse=None, fail_after=None,
                 error_delta=False, hang=False, healthy=True, fail_before=None):  # fmt: skip
        self.chunks, self.finish = chunks, finish
        self.refuse, self.fail_after, self.error_delta, self.hang = refuse, fail_after, error_delta, hang
        self.fail_before, self.healthy = fail_before, healthy
        self.chat_template: str | None = None
        self.scores: list = []
        self.requests: list[GenerateRequest] = []
        self.aborted: list[str] = []
        self.closed: list[str] = []
        self._abort_events: dict[str, asyncio.Event] = {}

    async def generate(self, req: GenerateRequest):
        self.requests.append(req)
        try:
            if self.fail_before is not None:
                raise self.fail_before
            if self.refuse:
                raise InvalidRequest(self.refuse)
            sp = req.params()  # the ingress sends only SamplingParams fields
            prompt_tokens = len(req.prompt_input())
            done = 0
            for k, chunk in enumerate(self.chunks):
                if self.fail_after is not None and k == self.fail_after:
                    raise RuntimeError("tower died")
                last = k == len(self.chunks) - 1
                toks = [ord(c) for c in chunk]
                done += len(toks)
                reason = ("error" if self.error_delta else self.finish) if last else None
                yield GenerateDelta(req.request_id, toks, chunk, last, reason, prompt_tokens, done,
                                    denoiser_forwards=2 * (k + 1), context_forwards=k + 1,
                                    logprobs=[-0.5] * len(toks) if sp.logprobs else None,
                                    seed=7 if last else None,
                                    error="boom" if last and self.error_delta else None,
                                    token_texts=list(chunk) if sp.logprobs else None)  # fmt: skip
                if self.hang:
                    ev = self._abort_events.setdefault(req.request_id, asyncio.Event())
                    await ev.wait()
                    yield GenerateDelta(req.request_id, [], "", True, "abort", prompt_tokens, done, 1, 1)
                    return
        finally:
            self.closed.append(req.request_id)

    async def score(self, req):
        """Characters as tokens; log p of the j-th scored token is -0.1 (j + 1); alternatives: the token
        itself, then "~" one nat below."""
        self.scores.append(req)
        prompt = req.prompt_token_ids if req.prompt is None else [ord(c) for c in req.prompt]
        cont = list(req.continuation_token_ids)
        n = len(prompt) - 1 if req.echo else 0
        lps = [-0.1 * (j + 1) for j in range(n + len(cont))]

        def top(tokens, lp):
            return [[(t, chr(t), x), (126, "~", x - 1.0)][: req.top_logprobs] for t, x in zip(tokens, lp, strict=True)]

        res = ScoreResult(cont, lps[n:], sum(lps[n:]), len(prompt), token_texts=[chr(t) for t in cont],
                          top_logprobs=top(cont, lps[n:]) if req.top_logprobs else None)  # fmt: skip
        if req.echo:
            res.prompt_token_ids, res.prompt_token_texts = prompt, [chr(t) for t in prompt]
            res.prompt_logprobs = [None, *lps[:n]]
            res.prompt_top_logprobs = [None, *top(prompt[1:], lps[:n])] if req.top_logprobs else None
        return res

    async def tokenize(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    async def detokenize(self, token_ids: list[int]) -> str:
        return "".join(chr(t) for t in token_ids)

    async def tokenizer_info(self) -> dict:
        return {"eos_token": "\x00", "bos_token": None, "chat_template": self.chat_template}

    async def model_info(self) -> ModelInfo:
        return INFO

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        ev = self._abort_events.get(request_id)
        if ev is not None:
            ev.set()

    async def health(self) -> bool:
        return self.healthy


def client_for(server: FakeServer) -> TestClient:
    return TestClient(build_openai_app(server, NAME))


def post(server: FakeServer, body: dict, **kw):
    return client_for(server).post("/v1/completions", json=body, **kw)


def sse_events(text: str) -> list[tuple[str | None, str]]:
    """(event name, data) per SSE event."""
    out = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        event, data = None, []
        for line in block.split("\n"):
            if line.startswith("event: "):
                event = line[len("event: ") :]
            elif line.startswith("data: "):
                data.append(line[len("data: ") :])
        out.append((event, "\n".join(data)))
    return out


# ---- non-streaming ---------------------------------------------------------------------------------
def test_completion_json_and_conversion():
    s = FakeServer()
    r = post(s, {"model": NAME, "prompt": "Hi", "max_tokens": 5, "temperature": 0, "top_p": 0.9, "seed": 3,
                 "stop": "\n", "user": "ignored", "mode": "diffusion", "block_size": 8, "steps_per_block": 4,
                 "gamma": 1, "top_k": 0, "ignore_eos": True, "stop_token_ids": [0, 5]})  # fmt: skip
    assert r.status_code == 200, r.text
    body = r.json()
    rid = r.headers["x-request-id"]
    assert body["id"] == f"cmpl-{rid}" and body["object"] == "text_completion" and body["model"] == NAME
    assert isinstance(body["created"], int)
    assert body["choices"] == [{"index": 0, "text": "Hello!", "logprobs": None, "finish_reason": "length", "seed": 7}]
    twotower = {"denoiser_forwards": 6, "context_forwards": 3, "tokens_per_forward": 6 / 9}
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 6, "total_tokens": 8,
                             "prompt_tokens_details": {"cached_tokens": 0}, "twotower": twotower}
    (req,) = s.requests
    assert req.request_id == rid and req.prompt == "Hi" and req.prompt_token_ids is None
    assert req.sampling == {"max_tokens": 5, "temperature": 0.0, "top_p": 0.9, "seed": 3, "stop": ["\n"],
                            "mode": "diffusion", "block_size": 8, "steps_per_block": 4, "gamma": 1.0, "top_k": 0,
                            "ignore_eos": True, "stop_token_ids": [0, 5]}  # fmt: skip
    assert isinstance(req.sampling["gamma"], float) and isinstance(req.sampling["temperature"], float)
    assert s.aborted == []  # finished normally


def test_absent_and_null_fields_leave_the_server_defaults():
    s = FakeServer(finish="stop")
    r = post(s, {"prompt": [5, 6, 7], "max_tokens": None, "seed": None, "stop": None, "n": 1, "logprobs": None,
                 "echo": False, "best_of": 1, "frequency_penalty": 0, "presence_penalty": 0.0, "logit_bias": {},
                 "suffix": "", "stream": False})  # fmt: skip
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] == "stop"
    (req,) = s.requests
    assert req.prompt is None and req.prompt_token_ids == [5, 6, 7] and req.sampling == {}


def test_every_sampling_field_has_a_request_field():
    assert set(SAMPLING_FIELDS) <= KNOWN_FIELDS


@pytest.mark.parametrize("lp", [0, True])
def test_logprobs_of_the_sampled_tokens(lp):
    s = FakeServer()
    r = post(s, {"prompt": "x", "logprobs": lp})
    assert r.status_code == 200, r.text
    assert s.requests[0].sampling == {"logprobs": True} and s.scores == []  # no scoring pass
    got = r.json()["choices"][0]["logprobs"]
    assert got["tokens"] == list("Hello!")  # each token's text, from the server
    assert got["token_logprobs"] == [-0.5] * 6 and got["top_logprobs"] is None
    assert got["text_offset"] == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("n", [1, 2])
def test_logprobs_top_alternatives_come_from_one_score(n):
    s = FakeServer()
    r = post(s, {"prompt": "x", "logprobs": n})
    assert r.status_code == 200, r.text
    (sc,) = s.scores
    assert sc.prompt == "x" and sc.continuation_token_ids == [ord(c) for c in "Hello!"] and sc.top_logprobs == n
    got = r.json()["choices"][0]["logprobs"]
    lps = [-0.1 * (j + 1) for j in range(6)]
    assert got["tokens"] == list("Hello!") and got["token_logprobs"] == pytest.approx(lps)
    want = [{c: lp, "~": lp - 1.0} if n == 2 else {c: lp} for c, lp in zip("Hello!", lps, strict=True)]
    assert got["top_logprobs"] == [pytest.approx(w) for w in want]


def test_echo_with_logprobs_as_lm_eval_reads_it():
    s = FakeServer(chunks=("!",))
    r = post(s, {"prompt": [ord(c) for c in "ab c"], "max_tokens": 1, "logprobs": 1, "echo": True,
                 "temperature": 0})  # fmt: skip
    assert r.status_code == 200, r.text
    (choice,) = r.json()["choices"]
    assert choice["text"] == "ab c!"  # the prompt (detokenized: it came as ids), then the completion
    lp = choice["logprobs"]
    assert lp["tokens"] == list("ab c!") and lp["text_offset"] == [0, 1, 2, 3, 4]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # nothing predicts token 0
    assert lp["token_logprobs"][1:] == pytest.approx([-0.1, -0.2, -0.3, -0.4])
    # lm-eval's is_greedy: each scored token's logprob is the largest of its alternatives
    pairs = zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:], strict=True)
    assert all(t == max(top.values()) for t, top in pairs)


def test_echo_without_logprobs_streams_the_prompt_first():
    s = FakeServer()
    r = post(s, {"prompt": "Q:", "echo": True, "stream": True})
    assert r.status_code == 200, r.text
    chunks = [json.loads(d) for e, d in sse_events(r.text) if d != "[DONE]"]
    assert [c["choices"][0]["text"] for c in chunks] == ["Q:", "Hel", "lo", "!"] and s.scores == []
    r = post(FakeServer(), {"prompt": "Q:", "echo": True})
    assert r.json()["choices"][0]["text"] == "Q:Hello!"


@pytest.mark.parametrize("body, param", [
    ({"logprobs": 2, "stream": True}, "logprobs"), ({"echo": True, "logprobs": 0, "stream": True}, "echo"),
    ({"logprobs": 21}, "logprobs"), ({"echo": "yes"}, "echo"), ({"logprobs": -1}, "logprobs"),
])  # fmt: skip
def test_logprobs_and_echo_refusals_name_the_field(body, param):
    s = FakeServer()
    r = post(s, {"prompt": "x", **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and s.requests == []


def test_tokenizer_routes_and_version():
    c = client_for(FakeServer())
    r = c.post("/tokenize", json={"prompt": "hi", "add_special_tokens": False, "model": NAME})
    assert r.status_code == 200 and r.json() == {"tokens": [104, 105], "count": 2, "max_model_len": 64}
    assert c.post("/detokenize", json={"tokens": [104, 105]}).json() == {"prompt": "hi"}
    assert c.get("/tokenizer_info").json()["eos_token"] == "\x00"
    from twotower.cluster import version

    assert c.get("/version").json() == {"version": version()} and version()[0].isdigit()
    for path, body, param in [("/tokenize", {}, "prompt"), ("/tokenize", {"prompt": 3}, "prompt"),
                              ("/tokenize", {"prompt": "x", "bogus": 1}, "bogus"),
                              ("/detokenize", {"tokens": ["a"]}, "tokens"),
                              ("/detokenize", {"tokens": [True]}, "tokens")]:  # fmt: skip
        r = c.post(path, json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (path, body, r.text)
    assert c.post("/tokenize", json={"prompt": "x", "model": "other"}).status_code == 404


def test_chat_needs_a_template_then_runs_as_a_completion():
    s = FakeServer()
    c = client_for(s)
    msgs = [{"role": "user", "content": "hi"}]
    r = c.post("/v1/chat/completions", json={"messages": msgs})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert "no chat template" in r.json()["error"]["message"] and s.requests == []
    s.chat_template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
                       "{% if add_generation_prompt %}<assistant>{% endif %}")
    r = c.post("/v1/chat/completions", json={"messages": msgs, "max_completion_tokens": 5, "model": NAME})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Hello!"}, "logprobs": None,
                                "finish_reason": "length"}]  # fmt: skip
    assert s.requests[-1].prompt == "<user>hi<assistant>" and s.requests[-1].sampling == {"max_tokens": 5}
    r = c.post("/v1/chat/completions", json={"messages": msgs, "stream": True})
    chunks = [json.loads(d) for e, d in sse_events(r.text) if d != "[DONE]"]
    assert [ch["choices"][0]["delta"] for ch in chunks] == [{"role": "assistant", "content": "Hel"},
                                                            {"content": "lo"}, {"content": "!"}]  # fmt: skip
    assert all(ch["object"] == "chat.completion.chunk" for ch in chunks) and r.text.endswith("data: [DONE]\n\n")
    for bad in ({"messages": []}, {"messages": [{"role": "user"}]}, {"messages": msgs, "logprobs": True},
                {"messages": msgs, "bogus": 1}):  # fmt: skip
        r = c.post("/v1/chat/completions", json=bad)
        assert r.status_code == 400, (bad, r.text)


def test_request_id_header_is_honoured_and_server_ids_stay_unique():
    s = FakeServer()
    c = client_for(s)
    for _ in range(2):
        r = c.post("/v1/completions", json={"prompt": "x"}, headers={"X-Request-Id": "trace-42"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "trace-42"
        assert r.json()["id"] == "cmpl-trace-42"
    a, b = (q.request_id for q in s.requests)
    assert a.startswith("trace-42-") and b.startswith("trace-42-") and a != b
    r = c.post("/v1/completions", json={"prompt": "x"}, headers={"X-Request-Id": "has space"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "X-Request-Id"


def test_batch_of_prompts():
    s = FakeServer()
    r = post(s, {"prompt": ["a", "bb"], "max_tokens": 4}, headers={"X-Request-Id": "b"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1] and {c["text"] for c in body["choices"]} == {"Hello!"}
    assert body["usage"]["prompt_tokens"] == 3 and body["usage"]["completion_tokens"] == 12
    ids = [q.request_id for q in s.requests]
    assert sorted(i[-2:] for i in ids) == ["-0", "-1"] and all(i.startswith("b-") for i in ids)
    r = post(FakeServer(), {"prompt": [[1, 2], [3]]})
    assert r.status_code == 200 and len(r.json()["choices"]) == 2


# ---- streaming -------------------------------------------------------------------------------------
def test_stream_chunks_usage_and_done():
    s = FakeServer()
    r = post(s, {"prompt": "Hi", "stream": True, "stream_options": {"include_usage": True}, "logprobs": 0})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == (None, "[DONE]")
    chunks = [json.loads(d) for _, d in events[:-1]]
    content, usage = chunks[:-1], chunks[-1]
    assert "".join(c["choices"][0]["text"] for c in content) == "Hello!"
    assert [c["choices"][0]["finish_reason"] for c in content] == [None, None, "length"]
    assert all(c["usage"] is None and c["object"] == "text_completion" and c["id"].startswith("cmpl-")
               for c in content)  # fmt: skip
    assert content[0]["choices"][0]["logprobs"]["token_logprobs"] == [-0.5] * 3
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 8
    assert usage["usage"]["twotower"]["denoiser_forwards"] == 6


def test_stream_without_usage_and_batched():
    r = post(FakeServer(), {"prompt": ["a", "b"], "stream": True})
    events = sse_events(r.text)
    assert events[-1] == (None, "[DONE]")
    chunks = [json.loads(d) for _, d in events[:-1]]
    assert all("usage" not in c for c in chunks)
    for i in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == i]
        assert "".join(c["text"] for c in mine) == "Hello!" and mine[-1]["finish_reason"] == "length"


def test_stream_continuous_usage():
    r = post(FakeServer(), {"prompt": "a", "stream": True, "stream_options": {"continuous_usage_stats": True}})
    chunks = [json.loads(d) for _, d in sse_events(r.text)[:-1]]
    assert [c["usage"]["completion_tokens"] for c in chunks] == [3, 5, 6]


def test_failure_mid_stream_is_an_error_event_without_done():
    s = FakeServer(fail_after=1)
    r = post(s, {"prompt": "a", "stream": True})
    assert r.status_code == 200
    events = sse_events(r.text)
    assert json.loads(events[0][1])["choices"][0]["text"] == "Hel"
    name, data = events[-1]
    err = json.loads(data)["error"]
    assert name == "error" and err["type"] == "server_error"
    assert "error id" in err["message"] and "tower died" not in err["message"]  # details stay in the log
    assert all(d != "[DONE]" for _, d in events)
    r = post(FakeServer(error_delta=True), {"prompt": "a", "stream": True})
    assert sse_events(r.text)[-1][0] == "error" and "error id" in r.text and "boom" not in r.text


# ---- errors ----------------------------------------------------------------------------------------
BAD = [
    ("max_tokens", 0), ("max_tokens", "5"), ("max_tokens", 1.5), ("max_tokens", True), ("max_tokens", 64),
    ("temperature", -1), ("temperature", "hot"), ("temperature", float("nan")), ("top_p", 0), ("top_p", 1.5),
    ("seed", -1), ("seed", 1.5), ("seed", 2**63), ("stop", 5), ("stop", [1]), ("stop", [""]), ("stop", ""),
    ("n", 2), ("n", True), ("best_of", 3), ("logprobs", -1), ("logprobs", "yes"),
    ("stream", "yes"), ("stream_options", {"include_usage": True}), ("mode", "beam"), ("mode", 3),
    ("block_size", 0), ("block_size", 33), ("steps_per_block", 0), ("gamma", 0), ("gamma", 2), ("top_k", -1),
    ("ignore_eos", "no"), ("stop_token_ids", [-1]), ("stop_token_ids", "5"), ("stop_token_ids", [260]),
    ("prompt", None), ("prompt", []), ("prompt", [1, "a"]), ("prompt", {"a": 1}), ("prompt", [-1]),
    ("prompt", [260]), ("prompt", [[]]), ("prompt", ["a"] * 65), ("prompt", list(range(60))),
    ("frequency_penalty", 0.5), ("presence_penalty", 1), ("logit_bias", {"1": 5}), ("suffix", "x"),
    ("model", 5), ("gama", 0.5),
]  # fmt: skip


@pytest.mark.parametrize("name,value", BAD, ids=[f"{n}={v!r}"[:40] for n, v in BAD])
def test_bad_values_are_400_naming_the_field(name, value):
    s = FakeServer()
    body = {"prompt": "x", name: value}
    if name == "prompt" and value is None:
        del body["prompt"]
    if name == "prompt" and value == list(range(60)):
        body["max_tokens"] = 8  # 60 + 8 > max_model_len 64
        name = "max_tokens"
    r = client_for(s).post("/v1/completions", content=json.dumps(body))  # json.dumps writes NaN
    assert r.status_code == 400, (name, value, r.text)
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["code"] is None
    assert err["param"] == name and name in err["message"], err
    assert not s.requests  # refused before the server was asked


def test_stream_options_keys_and_cross_field_rules():
    r = post(FakeServer(), {"prompt": "x", "stream": True, "stream_options": {"bogus": True}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options.bogus"
    r = post(FakeServer(), {"prompt": "x", "mode": "lossless", "temperature": 0.5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b""])
def test_bad_body(raw):
    r = client_for(FakeServer()).post("/v1/completions", content=raw)
    assert r.status_code == 400 and "request body" in r.json()["error"]["message"]


def test_unknown_model_is_404():
    r = post(FakeServer(), {"model": "gpt-4", "prompt": "x"})
    assert r.status_code == 404
    assert r.json()["error"] == {"message": "The model `gpt-4` does not exist.", "type": "invalid_request_error",
                                 "param": "model", "code": "model_not_found"}  # fmt: skip


@pytest.mark.parametrize("stream", [False, True])
def test_server_refusal_is_400(stream):
    msg = "SamplingParams.max_tokens: prompt (70 tokens) + max_tokens exceeds the context limit 64 (got 8)"
    s = FakeServer(refuse=msg)
    r = post(s, {"prompt": "long text", "stream": stream}, headers={"X-Request-Id": "r1"})
    assert r.status_code == 400 and r.headers["x-request-id"] == "r1"
    err = r.json()["error"]
    assert err["param"] == "max_tokens" and err["message"].startswith("max_tokens: prompt (70 tokens)")
    assert s.aborted == []  # a refused request has nothing to abort


@pytest.mark.parametrize("exc,status", [(RuntimeError("x"), 500), (ConnectionError("down"), 503),
                                        (TimeoutError(), 504)])  # fmt: skip
@pytest.mark.parametrize("stream", [False, True])
def test_server_failure_before_output_is_json(exc, status, stream):
    r = post(FakeServer(fail_before=exc), {"prompt": "x", "stream": stream})
    assert r.status_code == status and r.json()["error"]["type"] == "server_error"
    assert r.headers.get("retry-after") == ("1" if status == 503 else None)  # retryable: a Retry-After hint


def test_deeply_nested_json_is_400():
    body = "[" * 100_000 + "]" * 100_000
    r = client_for(FakeServer()).post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "nested too deeply" in r.json()["error"]["message"]


def test_error_delta_non_stream_is_500():
    r = post(FakeServer(error_delta=True), {"prompt": "x"})
    assert r.status_code == 500 and "error id" in r.json()["error"]["message"] and "boom" not in r.text


def test_unknown_route_is_openai_shaped():
    r = client_for(FakeServer()).get("/v1/nope")
    assert r.status_code == 404 and "error" in r.json()


# ---- models, health --------------------------------------------------------------------------------
def test_models_and_health():
    c = client_for(FakeServer())
    models = c.get("/v1/models").json()
    assert models["object"] == "list"
    (card,) = models["data"]
    assert card["id"] == NAME and card["object"] == "model" and card["max_model_len"] == 64
    assert card["twotower"]["modes"] == list(MODES) and card["twotower"]["max_block_size"] == 32
    assert c.get(f"/v1/models/{NAME}").json()["id"] == NAME
    assert c.get("/v1/models/other").status_code == 404
    assert c.get("/health").status_code == 200
    assert client_for(FakeServer(healthy=False)).get("/health").status_code == 503


# ---- client disconnect -> abort --------------------------------------------------------------------
async def _disconnect_after(app, body: dict, ready) -> list[dict]:
    """Drive the app as an ASGI server would: send the body, wait for `ready(sent)`, then disconnect."""
    raw = json.dumps(body).encode()
    sent: list[dict] = []
    fed = False

    async def receive():
        nonlocal fed
        if not fed:
            fed = True
            return {"type": "http.request", "body": raw, "more_body": False}
        while not ready(sent):
            await asyncio.sleep(0.01)
        return {"type": "http.disconnect"}

    async def send(msg):
        sent.append(msg)

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
             "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}  # fmt: skip
    await asyncio.wait_for(app(scope, receive, send), 5)
    return sent


def test_stream_disconnect_aborts():
    s = FakeServer(hang=True)
    app = build_openai_app(s, NAME)
    sent = asyncio.run(_disconnect_after(app, {"prompt": "x", "stream": True},
                                         lambda sent: any(m.get("body") for m in sent)))  # fmt: skip
    assert b"Hel" in b"".join(m.get("body", b"") for m in sent)
    assert s.aborted == [s.requests[0].request_id] == s.closed


def test_non_stream_disconnect_aborts():
    s = FakeServer(hang=True)
    sent = asyncio.run(_disconnect_after(build_openai_app(s, NAME), {"prompt": "x"}, lambda sent: s.requests))
    assert sent[0]["status"] == 499
    assert s.aborted == [s.requests[0].request_id] == s.closed


def test_send_failing_closes_the_stream_and_aborts():
    """ASGI spec 2.4 servers report a gone client by `send` raising OSError; the body generator, left at a
    `yield`, is closed at once and aborts."""
    s = FakeServer(hang=True)

    async def run():
        async def receive():
            return {"type": "http.request", "body": json.dumps({"prompt": "x", "stream": True}).encode()}

        async def send(msg):
            if msg["type"] == "http.response.body":
                raise OSError("connection reset")

        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
                 "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
                 "query_string": b"", "root_path": "", "headers": [], "client": ("127.0.0.1", 1),
                 "server": ("127.0.0.1", 80)}  # fmt: skip
        with pytest.raises(ClientDisconnect):
            await asyncio.wait_for(build_openai_app(s, NAME)(scope, receive, send), 5)
        assert s.aborted == [s.requests[0].request_id] == s.closed  # before the app returned

    asyncio.run(run())


# ---- the official openai client against uvicorn ------------------------------------------------------
@pytest.fixture(scope="module")
def live_server():
    s = FakeServer()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(build_openai_app(s, NAME), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield s, f"http://127.0.0.1:{port}/v1"
    server.should_exit = True
    thread.join(10)
    sock.close()


def test_openai_client(live_server):
    import openai

    s, base = live_server
    client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=10)
    assert [m.id for m in client.models.list()] == [NAME]
    c = client.completions.create(model=NAME, prompt="Hi", max_tokens=6,
                                  extra_body={"mode": "diffusion", "gamma": 0.8})  # fmt: skip
    assert c.choices[0].text == "Hello!" and c.choices[0].finish_reason == "length"
    assert c.usage.total_tokens == 8 and c.usage.model_extra["twotower"]["context_forwards"] == 3
    assert s.requests[-1].sampling == {"max_tokens": 6, "mode": "diffusion", "gamma": 0.8}

    stream = client.completions.create(model=NAME, prompt="Hi", max_tokens=6, stream=True,
                                       stream_options={"include_usage": True},
                                       extra_body={"mode": "diffusion", "gamma": 0.8})  # fmt: skip
    chunks = list(stream)
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == "Hello!"
    assert chunks[-1].usage.completion_tokens == 6

    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt="Hi", extra_body={"gamma": 5})
    assert e.value.body["param"] == "gamma"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="Hi")


@pytest.mark.parametrize("stream", [True, False])
def test_client_going_away_aborts_on_uvicorn(live_server, stream):
    try:
        import httpx2
    except ModuleNotFoundError:  # openai < 3 and older Starlette use httpx
        import httpx as httpx2

    s, base = live_server
    s.hang = True
    try:
        n = len(s.aborted)
        with httpx2.Client(timeout=0.5) as c:
            if stream:
                with c.stream("POST", f"{base}/completions", json={"prompt": "x", "stream": True}) as r:
                    assert r.status_code == 200
                    next(r.iter_lines())  # the first chunk arrived; now hang up
            else:
                with pytest.raises(httpx2.ReadTimeout):
                    c.post(f"{base}/completions", json={"prompt": "x"})
        deadline = time.monotonic() + 5
        while len(s.aborted) == n and time.monotonic() < deadline:
            time.sleep(0.02)
        assert s.aborted[n:] == [s.requests[-1].request_id]
    finally:
        s.hang = False
