"""The one health probe both ingresses answer with (grpc.health.v1 Check, HTTP GET /health)."""

from __future__ import annotations

import asyncio
import inspect
import logging

from .api_types import ServerClient

log = logging.getLogger("twotower.ingress")


async def server_healthy(server: ServerClient, timeout_s: float) -> bool:
    """Whether the server reports healthy within `timeout_s`. Its optional `health()` (sync or async)
    decides (a false value or an exception = unhealthy); a server without one is healthy while
    `model_info()` succeeds."""
    try:
        health = getattr(server, "health", None)
        if health is None:
            await asyncio.wait_for(server.model_info(), timeout_s)
            return True
        ok = health()
        if inspect.isawaitable(ok):
            ok = await asyncio.wait_for(ok, timeout_s)
        return bool(ok)
    except Exception:
        log.info("health check: server unhealthy", exc_info=True)
        return False
