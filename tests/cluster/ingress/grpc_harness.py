"""A GrpcIngress behind a plain grpc.aio server on its own event-loop thread, for tests."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator

import grpc

from twotower.cluster.ingress import grpc_service as gi


@contextlib.contextmanager
def running_grpc(make_ingress, server_tls=None, client_tls=None) -> Iterator[grpc.Channel]:
    """make_ingress() runs on the server's loop (a server it wraps may bind asyncio objects to that loop);
    yields a client channel (over TLS with `client_tls`, grpc.ChannelCredentials, when the server has
    `server_tls`). On exit every task left on the loop (an engine's step loop) is cancelled."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start():
        return await gi.start_grpc_server(make_ingress(), credentials=server_tls)

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(60)
    target = f"127.0.0.1:{port}"
    channel = grpc.secure_channel(target, client_tls) if client_tls else grpc.insecure_channel(target)
    channel.twotower_target = target  # for tests that open a second, differently configured channel
    try:
        yield channel
    finally:
        channel.close()

        async def stop():
            await server.stop(None)
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in others:
                t.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
