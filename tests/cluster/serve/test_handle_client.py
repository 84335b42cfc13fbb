"""HandleClient's migration over a fake deployment handle whose replicas are real engines (no Ray): a
stream whose pair dies mid-way goes on on another replica with no token repeated or lost, up to
migration_limit moves; attempts that stream nothing are retried without counting; other errors pass."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from twotower.cluster.engine.async_engine import AsyncEngine
from twotower.cluster.engine.errors import TowersUnavailable
from twotower.cluster.ingress.api_types import GenerateDelta, GenerateRequest
from twotower.cluster.ingress.errors import is_unavailable
from twotower.cluster.serve import handle_client
from twotower.cluster.serve.handle_client import HandleClient

from ..engine.test_engine import Towers


class ActorDiedError(Exception):
    """Stands for ray.exceptions.ActorDiedError (the classifier matches Ray's classes by name)."""


class FakeReplica:
    """A tower-pair server: a real engine; its pair 'dies' after `die_after` deltas of any stream."""

    def __init__(self, tw: Towers, sharp: bool, die_after: int | None = None) -> None:
        self.engine = AsyncEngine(tw.engine(sharp=sharp))
        self.die_after, self.dead, self.requests = die_after, False, []

    async def generate(self, req: GenerateRequest):
        if self.dead:
            raise ActorDiedError("replica gone")
        self.requests.append(req)
        n = 0
        async for out in self.engine.generate(req.prompt_input(), req.params(), req.request_id, req.resume):
            if self.die_after is not None and n >= self.die_after:
                self.dead = True
                raise TowersUnavailable("context tower actor died")
            n += 1
            yield GenerateDelta.from_output(out)


class FakeResponse:
    def __init__(self, agen) -> None:
        self.agen, self.cancelled = agen, False

    def __aiter__(self):
        return self.agen

    def cancel(self) -> None:
        self.cancelled = True
        asyncio.ensure_future(self.agen.aclose())


class FakeHandle:
    """handle.options(stream=True).generate.remote(req), routed round-robin over the replicas."""

    def __init__(self, replicas: list[FakeReplica]) -> None:
        self.replicas, self.turn = replicas, itertools.cycle(range(len(replicas)))
        self.generate = self

    def options(self, **_):
        return self

    def remote(self, req):
        return FakeResponse(self.replicas[next(self.turn)].generate(req))


@pytest.fixture(scope="module")
def tw() -> Towers:
    return Towers()


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch):
    monkeypatch.setattr(handle_client, "REJECT_BACKOFF_S", (0.0, 0.01, 0.01))


SPECS = [dict(mode="ar"), dict(mode="diffusion", block_size=4, gamma=0.3), dict(mode="lossless", block_size=4),
         dict(mode="mock_ar"), dict(mode="ar", temperature=0.8)]  # fmt: skip


def request(rid: str, spec: dict) -> GenerateRequest:
    return GenerateRequest(rid, prompt="def main():", sampling={"max_tokens": 20, "ignore_eos": True, **spec})


async def collect(client: HandleClient, req: GenerateRequest) -> list[GenerateDelta]:
    return [d async for d in client.generate(req)]


def tokens(deltas) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: "-".join(map(str, s.values())))
def test_a_stream_whose_pair_dies_continues_on_another_replica(tw, spec):
    sharp = spec["mode"] != "ar"

    async def main():
        ref = await collect(HandleClient(FakeHandle([FakeReplica(tw, sharp)])), request("r", spec))
        dying, healthy = FakeReplica(tw, sharp, die_after=2), FakeReplica(tw, sharp)
        client = HandleClient(FakeHandle([dying, healthy]), migration_limit=1)
        got = await collect(client, request("r", {**spec, "seed": ref[0].seed}))
        return ref, got, client, healthy

    ref, got, client, healthy = asyncio.run(main())
    assert len(ref) > 3
    assert tokens(got) == tokens(ref) and "".join(d.text for d in got) == "".join(d.text for d in ref)
    assert got[-1].finished and got[-1].completion_tokens == len(tokens(ref))
    assert client.migrations == 1
    moved = healthy.requests[0]
    assert moved.resume.token_ids == tokens(ref[:2]) and moved.sampling["seed"] == ref[0].seed


def test_a_sampled_stream_resumes_with_the_seed_the_server_drew(tw):
    spec = dict(mode="ar", temperature=0.8)  # no seed given: the first replica draws one

    async def main():
        client = HandleClient(FakeHandle([FakeReplica(tw, False, die_after=3), FakeReplica(tw, False)]))
        got = await collect(client, request("r", spec))
        ref = await collect(HandleClient(FakeHandle([FakeReplica(tw, False)])),
                            request("r", {**spec, "seed": got[0].seed}))  # fmt: skip
        return got, ref

    got, ref = asyncio.run(main())
    assert tokens(got) == tokens(ref)


async def until_error(client: HandleClient, req: GenerateRequest) -> tuple[list[GenerateDelta], Exception]:
    seen = []
    with pytest.raises(Exception) as err:
        async for d in client.generate(req):
            seen.append(d)
    return seen, err.value


def test_migration_off_ends_the_stream_unavailable(tw):
    client = HandleClient(FakeHandle([FakeReplica(tw, False, die_after=2), FakeReplica(tw, False)]), 0)
    seen, err = asyncio.run(until_error(client, request("r", dict(mode="ar"))))
    assert len(seen) == 2 and is_unavailable(err) and client.migrations == 0


def test_the_limit_counts_moves(tw):
    replicas = [FakeReplica(tw, False, die_after=2), FakeReplica(tw, False, die_after=2), FakeReplica(tw, False)]
    client = HandleClient(FakeHandle(replicas), migration_limit=1)
    seen, err = asyncio.run(until_error(client, request("r", dict(mode="ar"))))
    assert len(seen) == 4 and is_unavailable(err) and client.migrations == 1


def test_dead_replicas_are_retried_without_counting_and_then_unavailable(tw):
    async def main():
        dead = FakeReplica(tw, False)
        dead.dead = True
        client = HandleClient(FakeHandle([dead, FakeReplica(tw, False)]), migration_limit=0)
        ok = await collect(client, request("a", dict(mode="ar", max_tokens=4)))
        only_dead = HandleClient(FakeHandle([dead]), migration_limit=1)
        with pytest.raises(ActorDiedError):
            await collect(only_dead, request("b", dict(mode="ar")))
        return ok, client

    ok, client = asyncio.run(main())
    assert len(tokens(ok)) == 4 and client.migrations == 0


def test_bad_input_is_not_retried(tw):
    replica = FakeReplica(tw, False)

    async def main():
        client = HandleClient(FakeHandle([replica]))
        with pytest.raises(ValueError, match="temperature"):
            await collect(client, request("r", dict(mode="ar", temperature=-1.0)))

    asyncio.run(main())
    assert len(replica.requests) == 1


def test_the_moved_request_keeps_the_rest_of_its_deadline(tw):
    async def main():
        healthy = FakeReplica(tw, False)
        client = HandleClient(FakeHandle([FakeReplica(tw, False, die_after=2), healthy]))
        req = request("r", dict(mode="ar"))
        req.deadline_s = 60.0
        await collect(client, req)
        return healthy.requests[0]

    moved = asyncio.run(main())
    assert 0 < moved.deadline_s < 60.0 and moved.resume is not None
