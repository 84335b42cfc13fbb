"""The Serve application: one ingress deployment (OpenAI-compatible HTTP and the gRPC API on the same
replicas) in front of the tower-pair deployment (one replica = one tower pair in its own placement
group, autoscaled by Serve on ongoing requests).

`build_app` is the import path Serve configs point to (`twotower.cluster.serve.app:build_app`, args = a
ServeConfig as a dict; `twotower.cluster.app:build_app`, the path of configs deployed before the
layout moved, still resolves to it).
"""

from __future__ import annotations

import asyncio
from typing import Any

from ray import serve

from twotower.cluster.ingress.auth import ApiKeys
from twotower.cluster.ingress.grpc_service import GrpcIngress, build_grpc_server, host_port, server_credentials
from twotower.cluster.ingress.openai_app import build_openai_app

from .config import ServeConfig
from .deploy import INGRESS_DEPLOYMENT, pair_deployment_options
from .handle_client import HandleClient
from .loopback import bind_replica_server_to_loopback
from .metrics import MigrationCounter, count_errors
from .metrics_scrape import scrape
from .server import TowerPairServer

HEAD_NODE = "node:__internal_head__"  # the resource Ray gives the head node only


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    cfg = ServeConfig.from_dict(dict(args or {}))
    if cfg.replicas is None and cfg.autoscaling.max_replicas is None:  # `serve deploy` of an open bound
        import ray

        cfg = cfg.fit_to(ray.cluster_resources())
    keys_file = cfg.api_keys_file

    # One replica, on the head node: it holds the gRPC listener, which Kubernetes reaches on the head pod
    @serve.deployment(name=INGRESS_DEPLOYMENT, max_ongoing_requests=10_000,
                      ray_actor_options={"num_cpus": 0, "resources": {HEAD_NODE: 0.001}})  # fmt: skip
    @serve.ingress()
    class Ingress(GrpcIngress):
        """The gRPC API (GrpcIngress, on its own grpc.aio server in this replica) and the OpenAI-compatible
        HTTP app (through Serve's HTTP proxy)."""

        def __init__(self, server_handle) -> None:
            bind_replica_server_to_loopback()
            count_errors()  # errors answered by this replica, by API and code
            self.client = HandleClient(server_handle, cfg.migration_limit, MigrationCounter(cfg.served_model_name))
            # read on the replica's node: the file is a mounted Secret there
            self.api_keys = ApiKeys.from_file(keys_file) if keys_file else None
            # default_deadline_s: backstop for cancellations Serve's proxy can lose (docs/grpc.md)
            GrpcIngress.__init__(self, self.client, default_deadline_s=cfg.request_timeout_s, api_keys=self.api_keys)
            self.grpc_server = self._listen_grpc()

        def _listen_grpc(self):
            """twotower.v1, health and reflection on cfg.host:grpc_port, TLS when the config has a certificate
            (mTLS with tls_ca_certs), served on this replica's event loop. Serve's own gRPC proxy is not used:
            Ray 2.60's listens on every interface and has no TLS. gRPC sets SO_REUSEPORT, so a replacement
            replica binds while the old one drains."""
            tls = cfg.tls_certfile and server_credentials(cfg.tls_certfile, cfg.tls_keyfile, cfg.tls_ca_certs)
            server, _ = build_grpc_server(self, host_port(cfg.host, cfg.grpc_port), tls or None)
            self._grpc_start = asyncio.get_running_loop().create_task(server.start())
            return server

        def __serve_build_asgi_app__(self):
            return build_openai_app(self.client, cfg.served_model_name, api_keys=self.api_keys, metrics=scrape)

    opts = {k: v for k, v in pair_deployment_options(cfg).items() if v is not None}
    pair = serve.deployment(TowerPairServer).options(**opts)
    return Ingress.bind(pair.bind(cfg.to_dict()))
