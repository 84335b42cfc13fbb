"""The one error classifier of both APIs: what a server-side exception is reported as.

    kind (gRPC status)    HTTP  when
    INVALID_ARGUMENT      400   ValueError (InvalidRequest included): bad input; the message names the field
    UNIMPLEMENTED         501   NotImplementedError: a feature this server does not have
    RESOURCE_EXHAUSTED    429   Serve's back-pressure: the replicas' queues are full; retry later
    UNAVAILABLE           503   the towers or the replica are gone (engine.errors.TowersUnavailable, a dead
                                actor or replica, ConnectionError); retry, possibly elsewhere
    DEADLINE_EXCEEDED     504   a timeout
    INTERNAL              500   anything else: a bug

Only bad input is answered with the exception's own text (it names the field). Every other kind gets a
fixed sentence and an opaque error id; the exception, with its traceback, is logged here under that id,
once: internals (actor ids, node addresses, worker pids, ANSI-coloured tracebacks) never reach a
client. Retryable kinds carry a retry hint (`ApiError.retry_after_s`): HTTP's Retry-After header, gRPC's
`grpc-retry-pushback-ms` trailer.

An exception raised inside a Ray actor or replica arrives wrapped in a RayTaskError; the original (its
`cause`) is what gets classified. Ray's classes are matched by name, so this module imports no Ray, and
no gRPC or web framework either: each ingress turns the kind into its own status.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass

from twotower.cluster.engine.errors import LaneFailed, TowersUnavailable

log = logging.getLogger(__name__)
RETRY_AFTER_S = 1  # the hint sent with RESOURCE_EXHAUSTED and UNAVAILABLE

# Class names (anywhere in the MRO) meaning "the server cannot be reached now" / "overloaded".
_UNAVAILABLE = frozenset({"RayActorError", "ActorDiedError", "ActorUnavailableError", "DeploymentUnavailableError",
                          "ReplicaUnavailableError", "WorkerCrashedError", "NodeDiedError",
                          "LocalRayletDiedError"})  # fmt: skip
_EXHAUSTED = frozenset({"BackPressureError", "PendingCallsLimitExceeded"})

# Called with (api, code) for every error answered at either boundary ("http", "400"; "grpc",
# "INVALID_ARGUMENT"): the Serve app counts them (serve/metrics.py); empty outside it.
ERROR_HOOKS: list = []


def report_error(api: str, code: str) -> None:
    for hook in ERROR_HOOKS:
        try:
            hook(api, code)
        except Exception:  # a metrics failure must not change the answer
            log.debug("error hook failed", exc_info=True)


HTTP_STATUS = {"INVALID_ARGUMENT": 400, "UNIMPLEMENTED": 501, "RESOURCE_EXHAUSTED": 429, "UNAVAILABLE": 503,
               "DEADLINE_EXCEEDED": 504, "INTERNAL": 500}  # fmt: skip


@dataclass(frozen=True)
class ApiError:
    kind: str  # a grpc.StatusCode member name (the keys of HTTP_STATUS)
    message: str

    @property
    def http_status(self) -> int:
        return HTTP_STATUS[self.kind]

    @property
    def retryable(self) -> bool:
        return self.kind in ("RESOURCE_EXHAUSTED", "UNAVAILABLE")

    @property
    def retry_after_s(self) -> int | None:
        return RETRY_AFTER_S if self.retryable else None


def original(exc: BaseException) -> BaseException:
    """The exception a RayTaskError carries (raised in an actor or replica), else `exc` itself."""
    cause = getattr(exc, "cause", None)
    if any(c.__name__.startswith("RayTaskError") for c in type(exc).__mro__) and isinstance(cause, BaseException):
        return cause
    return exc


def error_id(exc: BaseException, kind: str) -> str:
    """The opaque id of `exc` (the same however often it is classified); logs the exception the first time."""
    if isinstance(exc, LaneFailed):  # the engine logged the lane's failure under this id already
        return exc.error_id
    eid = getattr(exc, "_twotower_error_id", None)
    if eid is None:
        eid = uuid.uuid4().hex[:12]
        try:
            exc._twotower_error_id = eid
        except AttributeError:  # an exception type without a __dict__: logged per classification
            pass
        log.error("%s, error id %s: %s: %s", kind, eid, type(exc).__name__, exc, exc_info=exc)
    return eid


def is_unavailable(exc: BaseException) -> bool:
    """Whether `exc` means the tower pair or its replica is gone (UNAVAILABLE): a request it ended may be
    retried, or resumed, on another replica. Logs nothing."""
    exc = original(exc)
    names = {c.__name__ for c in type(exc).__mro__}
    if isinstance(exc, ValueError) or names & _EXHAUSTED:
        return False
    return isinstance(exc, (ConnectionError, TowersUnavailable)) or bool(names & _UNAVAILABLE)


def classify(exc: BaseException) -> ApiError:
    exc = original(exc)
    names = {c.__name__ for c in type(exc).__mro__}
    if isinstance(exc, ValueError):
        return ApiError("INVALID_ARGUMENT", str(exc))
    if isinstance(exc, NotImplementedError):
        return ApiError("UNIMPLEMENTED", f"not supported by this server: {exc}")
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return ApiError("DEADLINE_EXCEEDED", f"server timed out (error id {error_id(exc, 'timeout')})")
    if names & _EXHAUSTED:
        return ApiError("RESOURCE_EXHAUSTED", "server overloaded, retry later")
    if is_unavailable(exc):
        eid = error_id(exc, "unavailable")
        return ApiError("UNAVAILABLE", f"tower-pair server unavailable, retry (error id {eid})")
    return ApiError("INTERNAL", f"internal error (error id {error_id(exc, 'internal error')})")
