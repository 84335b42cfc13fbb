"""Keep a replica's inter-deployment gRPC server on loopback when the Ray node itself is 127.0.0.1.

`twotower serve` without --address starts a one-machine Ray whose node address is 127.0.0.1
(cli/serving.py), so Ray's own servers listen on loopback only. Serve 2.60 still starts one more gRPC
server per replica (handle calls between deployments) on "[::]:0", every interface, with no option
(ray/serve/_private/replica.py, `_on_initialized`). On such a node nothing outside it may call in, so
that bind is narrowed to 127.0.0.1 here, before Serve starts the server. On a multi-node cluster (node
address not loopback) nothing changes. If Ray's internals differ (another version), this does nothing.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def bind_replica_server_to_loopback() -> bool:
    """Patch Serve's replica-server bind in this process when this node is 127.0.0.1; returns whether it did."""
    try:
        import ray
        from ray.serve._private import replica
    except ImportError:
        return False
    try:
        node_ip = ray.util.get_node_ip_address()
    except Exception:
        return False
    original = getattr(replica, "add_port_to_grpc_server", None)
    if node_ip != "127.0.0.1" or original is None or getattr(original, "_twotower_loopback", False):
        return False

    def add_port(server, address: str, *a, **kw):
        if address.startswith("[::]:") or address.startswith("0.0.0.0:"):
            address = "127.0.0.1:" + address.rsplit(":", 1)[1]
        return original(server, address, *a, **kw)

    add_port._twotower_loopback = True
    replica.add_port_to_grpc_server = add_port
    log.info("replica gRPC server bound to 127.0.0.1 (loopback-only Ray node)")
    return True
