"""The one error classifier of both APIs: what a server-side exception is reported as.

    kind (gRPC status)    HTTP  when
    INVALID_ARGUMENT      400   ValueError (InvalidRequest included): bad input; the message names the field
    UNIMPLEMENTED         501   NotImplementedError: a feature this server does not have
    RESOURCE_EXHAUSTED    429   Serve's back-pressure: the replicas' queues are full; retry later
    UNAVAILABLE           503   the towers or the replica are gone (engine.errors.TowersUnavailable, a dead
                                actor or replica, ConnectionError); retry, possibly elsewhere
    DEADLINE_EXCEEDED     504   a timeout
    INTERNAL              500   anything else: a bug

An exception raised inside a Ray actor or replica arrives wrapped in a RayTaskError; the original (its
`cause`) is what gets classified. Ray's classes are matched by name, so this module imports no Ray, and
no gRPC or web framework either: each ingress turns the kind into its own status.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from twotower.cluster.engine.errors import TowersUnavailable

# Class names (anywhere in the MRO) meaning "the server cannot be reached now" / "overloaded".
_UNAVAILABLE = frozenset({"RayActorError", "ActorDiedError", "ActorUnavailableError", "DeploymentUnavailableError",
                          "ReplicaUnavailableError", "WorkerCrashedError", "NodeDiedError",
                          "LocalRayletDiedError"})  # fmt: skip
_EXHAUSTED = frozenset({"BackPressureError", "PendingCallsLimitExceeded"})

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


def original(exc: BaseException) -> BaseException:
    """The exception a RayTaskError carries (raised in an actor or replica), else `exc` itself."""
    cause = getattr(exc, "cause", None)
    if any(c.__name__.startswith("RayTaskError") for c in type(exc).__mro__) and isinstance(cause, BaseException):
        return cause
    return exc


def classify(exc: BaseException) -> ApiError:
    exc = original(exc)
    names = {c.__name__ for c in type(exc).__mro__}
    if isinstance(exc, ValueError):
        return ApiError("INVALID_ARGUMENT", str(exc))
    if isinstance(exc, NotImplementedError):
        return ApiError("UNIMPLEMENTED", f"not supported by this server: {exc}")
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return ApiError("DEADLINE_EXCEEDED", f"server timed out: {exc}" if str(exc) else "server timed out")
    if names & _EXHAUSTED:
        return ApiError("RESOURCE_EXHAUSTED", f"server overloaded, retry later: {exc}")
    if isinstance(exc, (ConnectionError, TowersUnavailable)) or names & _UNAVAILABLE:
        return ApiError("UNAVAILABLE", f"tower-pair server unavailable: {type(exc).__name__}: {exc}")
    return ApiError("INTERNAL", f"server error: {type(exc).__name__}: {exc}")
