"""One classifier for both APIs: every failure kind gets the same status over gRPC and HTTP."""

from __future__ import annotations

import logging

import grpc
import pytest

from twotower.cluster.engine.errors import EngineError, TowersUnavailable, wrap_step_error
from twotower.cluster.ingress.api_types import InvalidRequest
from twotower.cluster.ingress.errors import HTTP_STATUS, classify
from twotower.cluster.ingress.grpc_convert import GrpcStatus, status_for_exception
from twotower.cluster.ingress.openai_protocol import error_from_exception


class RayTaskError(Exception):  # what a DeploymentHandle raises for an exception in a replica
    def __init__(self, cause):
        super().__init__("Traceback (most recent call last): ... long ...")
        self.cause = cause


class ActorDiedError(Exception):
    pass


class BackPressureError(Exception):
    pass


class TowerPairError(TowersUnavailable):  # as actors/pair.py defines it (without importing Ray here)
    pass


CASES = [
    (InvalidRequest("gamma: must be in (0, 1]"), "INVALID_ARGUMENT", 400),
    (RayTaskError(ValueError("prompt: too long")), "INVALID_ARGUMENT", 400),
    (NotImplementedError("echo"), "UNIMPLEMENTED", 501),
    (BackPressureError("full"), "RESOURCE_EXHAUSTED", 429),
    (ActorDiedError("gone"), "UNAVAILABLE", 503),
    (TowerPairError("pair-1: a tower actor died"), "UNAVAILABLE", 503),
    (RayTaskError(TowerPairError("pair-1: a tower actor died")), "UNAVAILABLE", 503),
    (wrap_step_error("r1", TowerPairError("died")), "UNAVAILABLE", 503),
    (ConnectionError("refused"), "UNAVAILABLE", 503),
    (TimeoutError(), "DEADLINE_EXCEEDED", 504),
    (wrap_step_error("r1", KeyError("x")), "INTERNAL", 500),
    (KeyError("x"), "INTERNAL", 500),
]


@pytest.mark.parametrize("exc,kind,http", CASES, ids=[f"{type(c[0]).__name__}-{c[1]}" for c in CASES])
def test_grpc_and_http_agree(exc, kind, http):
    err = classify(exc)
    assert (err.kind, err.http_status) == (kind, http)
    code, details = status_for_exception(exc)
    assert code == getattr(grpc.StatusCode, kind) and details == err.message
    http_err = error_from_exception(exc)
    assert http_err.status == http and http_err.message == err.message


def test_messages():
    assert status_for_exception(RayTaskError(InvalidRequest("prompt: too long"))) == (
        grpc.StatusCode.INVALID_ARGUMENT, "prompt: too long")  # the original, not the traceback text
    code, details = status_for_exception(KeyError("secret-10.0.0.7"))
    assert code == grpc.StatusCode.INTERNAL and details.startswith("internal error (error id ")
    assert "secret" not in details and "KeyError" not in details
    assert error_from_exception(InvalidRequest("gamma: must be in (0, 1]")).param == "gamma"


def test_every_kind_has_an_http_status_and_a_grpc_code():
    for kind in HTTP_STATUS:
        assert isinstance(getattr(grpc.StatusCode, kind), grpc.StatusCode)


def test_a_step_failure_keeps_its_kind_and_names_the_request():
    assert isinstance(wrap_step_error("r7", TowerPairError("died")), TowersUnavailable)
    e = wrap_step_error("r7", RuntimeError("boom"))
    assert type(e) is EngineError and "r7" in str(e) and "boom" in str(e)


def test_an_explicit_grpc_status_passes_through():
    assert status_for_exception(GrpcStatus(grpc.StatusCode.NOT_FOUND, "x")) == (grpc.StatusCode.NOT_FOUND, "x")


def test_internals_are_logged_under_the_id_the_client_gets():
    exc = RayTaskError(ActorDiedError("actor 3f2a on node 10.0.0.7 died, pid 4242"))
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("twotower.cluster.ingress.errors")
    logger.addHandler(handler)
    try:
        code, details = status_for_exception(exc)
        http = error_from_exception(exc)
    finally:
        logger.removeHandler(handler)
    eid = details.split("error id ")[1].rstrip(")")
    assert code == grpc.StatusCode.UNAVAILABLE and http.message == details  # one id, both APIs
    assert "10.0.0.7" not in details and "4242" not in details
    logged = [r for r in records if eid in r.getMessage()]
    assert len(logged) == 1 and "10.0.0.7" in logged[0].getMessage()  # logged once, with the details


def test_retryable_kinds_carry_a_retry_hint():
    assert classify(BackPressureError("full")).retry_after_s == 1
    assert classify(ActorDiedError("gone")).retry_after_s == 1
    assert classify(ValueError("x: bad")).retry_after_s is None and classify(KeyError("k")).retry_after_s is None
    assert error_from_exception(BackPressureError("full")).retry_after_s == 1
