"""What the engine raises to the requests it could not finish. The ingresses' one error classifier
(ingress/errors.py) turns these into statuses, so a new failure kind is added here and mapped there."""

from __future__ import annotations


class EngineError(RuntimeError):
    """The towers failed while this request was in flight."""


class TowersUnavailable(EngineError, ConnectionError):
    """The towers are gone (a dead actor, a lost device): nothing on this executor can run, and the
    request may be retried on another replica. Executors raise a subclass of it."""


def wrap_step_error(request_id: str, error: BaseException) -> EngineError:
    """The error a request sees when the engine step serving it failed with `error`; keeps the kind."""
    cls = TowersUnavailable if isinstance(error, TowersUnavailable) else EngineError
    return cls(f"request {request_id} failed: {type(error).__name__}: {error}")
