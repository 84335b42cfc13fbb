"""The Serve application: one ingress deployment (OpenAI-compatible HTTP and the gRPC API on the same
replicas) in front of the tower-pair deployment (one replica = one tower pair in its own placement
group, autoscaled by Serve on ongoing requests).

`build_app` is the import path Serve configs point to (`twotower.cluster.serve.app:build_app`, args = a
ServeConfig as a dict; `twotower.cluster.app:build_app`, the path of configs deployed before the
layout moved, still resolves to it).
"""

from __future__ import annotations

from typing import Any

from ray import serve

from twotower.cluster.ingress.auth import ApiKeys
from twotower.cluster.ingress.grpc_service import GrpcIngress
from twotower.cluster.ingress.openai_app import build_openai_app

from .config import ServeConfig
from .deploy import INGRESS_DEPLOYMENT, pair_deployment_options
from .handle_client import HandleClient
from .metrics import MigrationCounter, count_errors
from .metrics_scrape import scrape
from .server import TowerPairServer


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    cfg = ServeConfig.from_dict(dict(args or {}))
    if cfg.replicas is None and cfg.autoscaling.max_replicas is None:  # `serve deploy` of an open bound
        import ray

        cfg = cfg.fit_to(ray.cluster_resources())
    keys_file = cfg.api_keys_file

    @serve.deployment(name=INGRESS_DEPLOYMENT, max_ongoing_requests=10_000, ray_actor_options={"num_cpus": 0})
    @serve.ingress()
    class Ingress(GrpcIngress):
        """gRPC methods (GrpcIngress) and the OpenAI-compatible HTTP app on the same replicas."""

        def __init__(self, server_handle) -> None:
            count_errors()  # errors answered by this replica, by API and code
            self.client = HandleClient(server_handle, cfg.migration_limit, MigrationCounter(cfg.served_model_name))
            # read on the replica's node: the file is a mounted Secret there
            self.api_keys = ApiKeys.from_file(keys_file) if keys_file else None
            # default_deadline_s: backstop for cancellations Serve's proxy can lose (docs/grpc.md)
            GrpcIngress.__init__(self, self.client, default_deadline_s=cfg.request_timeout_s, api_keys=self.api_keys)

        def __serve_build_asgi_app__(self):
            return build_openai_app(self.client, cfg.served_model_name, api_keys=self.api_keys, metrics=scrape)

    opts = {k: v for k, v in pair_deployment_options(cfg).items() if v is not None}
    pair = serve.deployment(TowerPairServer).options(**opts)
    return Ingress.bind(pair.bind(cfg.to_dict()))
