"""What the engine raises to the requests it could not finish. The ingresses' one error classifier
(ingress/errors.py) turns these into statuses, so a new failure kind is added here and mapped there."""

from __future__ import annotations


class EngineError(RuntimeError):
    """The towers failed while this request was in flight."""


class TowersUnavailable(EngineError, ConnectionError):
    """The towers are gone (a dead actor, a lost device): nothing on this executor can run, and the
    request may be retried on another replica. Executors raise a subclass of it."""


class LaneFailed(EngineError):
    """A tower operation of one lane raised: that lane's requests fail with this, the engine and its other
    lanes keep serving. The message a client sees carries only an opaque error id; the details are in
    the server log under the same id."""

    def __init__(self, lane: str, error_id: str) -> None:
        super().__init__(f"internal error (error id {error_id})")
        self.lane, self.error_id = lane, error_id


class LaneOpError(EngineError):
    """An executor op of `lane` that nobody waited for failed (raised from `TowerExecutor.check`)."""

    def __init__(self, lane: str, message: str) -> None:
        super().__init__(message)
        self.lane = lane


def wrap_step_error(request_id: str, error: BaseException) -> EngineError:
    """The error a request sees when the engine step serving it failed with `error`; keeps the kind."""
    if isinstance(error, LaneFailed):
        return LaneFailed(error.lane, error.error_id)
    cls = TowersUnavailable if isinstance(error, TowersUnavailable) else EngineError
    return cls(f"request {request_id} failed: {type(error).__name__}: {error}")
