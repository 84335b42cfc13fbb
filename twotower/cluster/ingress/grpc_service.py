"""The gRPC ingress: the `twotower.v1.TwoTower` service (twotower/protos/twotower_v1.proto) and grpc.health.v1.

`GrpcIngress(server)` turns protobuf requests into `api_types` requests for a `ServerClient` and the
server's answers back into protobuf, with the conversion functions of `grpc_convert.py` (the only place
that converts between the two); this module is the service around them: calls, status codes, aborts,
health, and the plain server. Its methods are named after the RPCs, so the same object serves

* on a plain `grpc.aio` server (`build_grpc_server`): how the Serve app serves it (serve/app.py: the
  ingress replica listens on ServeConfig.host and grpc_port, with TLS from the config), and tests;
* behind Ray Serve's gRPC proxy (`gRPCOptions.grpc_servicer_functions` naming
  `twotower_v1_pb2_grpc.add_TwoTowerServicer_to_server`): the proxy passes a `RayServegRPCContext` as
  `grpc_context`. The app no longer uses it: Serve 2.60's proxy listens on every interface, without TLS.

Errors reach the client as a status code with details naming the bad field, by the classifier both
APIs share (errors.py: bad input -> INVALID_ARGUMENT, the towers gone -> UNAVAILABLE, overloaded ->
RESOURCE_EXHAUSTED, a timeout -> DEADLINE_EXCEEDED, anything else -> INTERNAL). How a code travels:

* Serve: `RayServegRPCContext` is a copy of the proxy's context that travels back only with a yielded
  or returned message, so a code set on it and followed by a plain `return` is lost (a stream that
  yielded nothing ends OK). If the method *raises* after setting the code, the replica wraps the
  exception in `gRPCStatusError` carrying the code and details, and the proxy ends the call with them
  (otherwise any exception becomes INTERNAL with the exception text). So: set code + details, raise.
* plain grpc.aio: an exception after `set_code` ends the call with UNKNOWN; `await context.abort(code,
  details)` is the way, so `_fail` calls `abort` when the context has one (RayServegRPCContext has not).

Cancellation: when the client goes away (or the gRPC deadline passes) the handler is cancelled or the
generator closed, and `Generate` aborts the request on the server. Behind Serve this is best effort: the
2.60 proxy cancels the replica only if the cancel lands while it waits for the next chunk, not while it
is sending one (then the replica runs on to the end of the request); `default_deadline_s` bounds that.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from twotower.protos import SERVICE_NAME
from twotower.protos import twotower_v1_pb2 as pb2
from twotower.protos import twotower_v1_pb2_grpc as pb2_grpc

from .api_types import ServerClient
from .auth import UNAUTHENTICATED, ApiKeys, authorization_of
from .errors import RETRY_AFTER_S, report_error
from .grpc_convert import (
    GrpcStatus,
    chunk_from_delta,
    generate_request_from_proto,
    model_info_reply,
    score_reply_from_result,
    score_request_from_proto,
    status_for_exception,
)
from .health import server_healthy

logger = logging.getLogger(__name__)

MAX_DETAILS = 4000  # characters of an error message sent to the client


async def _fail(grpc_context: Any, code: grpc.StatusCode, details: str) -> NoReturn:
    """End the call with `code` and `details` on either kind of context (module docstring)."""
    details = details if len(details) <= MAX_DETAILS else details[: MAX_DETAILS - 15] + "... [truncated]"
    report_error("grpc", code.name)
    if grpc_context is not None:
        grpc_context.set_code(code)
        grpc_context.set_details(details)
        abort = getattr(grpc_context, "abort", None)
        if abort is not None:  # grpc.aio.ServicerContext: raises, ending the call with this status
            await abort(code, details)
    raise GrpcStatus(code, details)


async def _fail_for(grpc_context: Any, exc: BaseException, what: str) -> NoReturn:
    code, details = status_for_exception(exc)
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNIMPLEMENTED):
        logger.debug("%s rejected: %s", what, details)
    else:
        logger.warning("%s failed: %s", what, details)  # errors.classify logged the exception itself
    set_trailers = getattr(grpc_context, "set_trailing_metadata", None)
    if code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE) and set_trailers is not None:
        set_trailers((("grpc-retry-pushback-ms", str(RETRY_AFTER_S * 1000)),))  # gRPC's retry hint
    await _fail(grpc_context, code, details)


# ---- the ingress ------------------------------------------------------------------------------------


class GrpcIngress:
    """`twotower.v1.TwoTower` + `grpc.health.v1.Health/Check` over a `ServerClient`.

    `grpc_context` is Serve's RayServegRPCContext, a grpc.aio ServicerContext, or None (direct calls:
    failures then raise `GrpcStatus`).
    """

    def __init__(self, server: ServerClient, health_timeout_s: float = 5.0, default_deadline_s: float | None = None,
                 api_keys: ApiKeys | None = None):  # fmt: skip
        """default_deadline_s: deadline_s of requests that bring neither a deadline_s nor a gRPC deadline
        the ingress can see. Behind Serve it is the backstop for lost cancellations: Serve 2.60's proxy does
        not cancel the replica when the client's cancel lands while it is sending a chunk (docs/grpc.md).
        api_keys: when given, every method but Check needs one of them (auth.py)."""
        self._server = server
        self._health_timeout_s = health_timeout_s
        self._default_deadline_s = default_deadline_s
        self._api_keys = api_keys

    async def _authenticate(self, grpc_context: Any) -> None:
        if self._api_keys is None:
            return
        metadata = getattr(grpc_context, "invocation_metadata", None)
        if not self._api_keys.allows(authorization_of(metadata() if metadata is not None else None)):
            await _fail(grpc_context, grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED)

    async def Generate(
        self, request: pb2.GenerateRequest, grpc_context: Any = None
    ) -> AsyncIterator[pb2.GenerateChunk]:
        await self._authenticate(grpc_context)
        try:
            req = generate_request_from_proto(request, grpc_context)
        except ValueError as e:
            await _fail(grpc_context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if req.deadline_s is None:
            req.deadline_s = self._default_deadline_s
        if req.deadline_s is not None and req.deadline_s <= 0:
            await _fail(grpc_context, grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed before the request started")

        stream: Any = None
        error: BaseException | None = None
        ended = False  # the server is done with the request: finished, or failed on its side
        try:
            try:
                stream = self._server.generate(req)
                it = stream.__aiter__()
            except Exception as e:
                error, ended = e, True
            while not ended:
                try:
                    delta = await it.__anext__()
                except StopAsyncIteration:
                    ended = True  # (a stream should end with a finished delta; tolerate one that does not)
                    break
                except Exception as e:  # asyncio.CancelledError (client gone) is not an Exception
                    error, ended = e, True
                    break
                if delta.finish_reason == "error":
                    error, ended = RuntimeError(f"generation failed: {delta.error or 'engine error'}"), True
                    break
                ended = delta.finished
                yield chunk_from_delta(delta)  # GeneratorExit here when the client went away
        finally:
            # Cancelled (client disconnected, deadline, Serve request timeout) or closed early: the
            # server would keep generating for nobody, so abort the request there.
            if not ended:
                await self._abort(req.request_id)
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()
                except Exception:  # pragma: no cover - best effort
                    logger.debug("closing the server stream of %s failed", req.request_id, exc_info=True)
        if error is not None:
            await _fail_for(grpc_context, error, f"Generate {req.request_id}")

    async def _abort(self, request_id: str) -> None:
        try:
            # shield: a second cancellation of this task must not cut the abort itself short
            await asyncio.shield(asyncio.ensure_future(self._server.abort(request_id)))
        except BaseException:  # noqa: B036 - cleanup path; never mask the original exit
            logger.warning("aborting request %s failed", request_id, exc_info=True)

    async def Score(self, request: pb2.ScoreRequest, grpc_context: Any = None) -> pb2.ScoreReply:
        await self._authenticate(grpc_context)
        try:
            req = score_request_from_proto(request)
        except ValueError as e:
            await _fail(grpc_context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        try:
            result = await self._server.score(req)
        except Exception as e:
            await _fail_for(grpc_context, e, "Score")
        return score_reply_from_result(result)

    async def ModelInfo(self, request: pb2.ModelInfoRequest, grpc_context: Any = None) -> pb2.ModelInfoReply:
        await self._authenticate(grpc_context)
        try:
            info = await self._server.model_info()
        except Exception as e:
            await _fail_for(grpc_context, e, "ModelInfo")
        return model_info_reply(info)

    async def Check(
        self, request: health_pb2.HealthCheckRequest, grpc_context: Any = None
    ) -> health_pb2.HealthCheckResponse:
        """grpc.health.v1: SERVING while the server is healthy (health.server_healthy) within
        health_timeout_s, NOT_SERVING otherwise. Service "" = the whole server."""
        service = getattr(request, "service", "")
        if service not in ("", SERVICE_NAME):
            await _fail(grpc_context, grpc.StatusCode.NOT_FOUND, f"service: unknown service {service!r}")
        status = health_pb2.HealthCheckResponse.SERVING
        if not await self.healthy():
            status = health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status)

    async def healthy(self) -> bool:
        return await server_healthy(self._server, self._health_timeout_s)


# ---- a plain grpc.aio server (tests, running without Serve) -----------------------------------------


class _Health(health_pb2_grpc.HealthServicer):
    def __init__(self, ingress: GrpcIngress):
        self._ingress = ingress

    async def Check(self, request, context):
        return await self._ingress.Check(request, context)

    async def Watch(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Watch is not supported; poll Check")
        yield  # pragma: no cover - makes this an async generator (a server-streaming handler)


def server_credentials(certfile: str, keyfile: str, ca_certs: str | None = None) -> grpc.ServerCredentials:
    """TLS for the gRPC server from PEM files; with `ca_certs`, clients must present a certificate that CA
    signed (mTLS)."""
    from pathlib import Path

    pair = (Path(keyfile).read_bytes(), Path(certfile).read_bytes())
    ca = Path(ca_certs).read_bytes() if ca_certs else None
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)


def host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def build_grpc_server(
    ingress: GrpcIngress, address: str = "127.0.0.1:0", credentials: grpc.ServerCredentials | None = None,
    **server_kwargs: Any,
) -> tuple[grpc.aio.Server, int]:  # fmt: skip
    """A grpc.aio server (not started; create it inside the running event loop) serving `ingress` as
    twotower.v1.TwoTower, grpc.health.v1.Health and server reflection, on `address` only, with TLS when
    `credentials` are given. Returns (server, bound port); a port that cannot be bound raises here."""
    from grpc_reflection.v1alpha import reflection

    server = grpc.aio.server(**server_kwargs)
    pb2_grpc.add_TwoTowerServicer_to_server(ingress, server)
    health_pb2_grpc.add_HealthServicer_to_server(_Health(ingress), server)
    health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
    reflection.enable_server_reflection([SERVICE_NAME, health_name, reflection.SERVICE_NAME], server)
    try:
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError:  # grpcio raises on a bind failure (older versions return 0)
        port = 0
    if port == 0:
        raise RuntimeError(f"could not bind the gRPC server to {address}")
    return server, port


async def start_grpc_server(
    ingress: GrpcIngress, address: str = "127.0.0.1:0", credentials: grpc.ServerCredentials | None = None,
    **server_kwargs: Any,
) -> tuple[grpc.aio.Server, int]:  # fmt: skip
    server, port = build_grpc_server(ingress, address, credentials, **server_kwargs)
    await server.start()
    return server, port
