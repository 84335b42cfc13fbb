"""The Serve application: one ingress deployment (OpenAI-compatible HTTP and the gRPC API on the same
replicas) in front of the tower-pair deployment (one replica = one tower pair in its own placement
group, autoscaled by Serve on ongoing requests).

`build_app` is the import path Serve configs point to (`twotower.cluster.app:build_app`, args = a
ServeConfig as a dict); `start_serve` runs it on the Ray cluster this process is connected to.
"""

from __future__ import annotations

from typing import Any

from ray import serve

from .grpc_ingress import GrpcIngress, grpc_servicer_functions
from .handle_client import HandleClient
from .openai_api import build_openai_app
from .serve_config import ServeConfig
from .server import TowerPairServer

PAIR_DEPLOYMENT = "TowerPair"
INGRESS_DEPLOYMENT = "Ingress"


def pair_deployment_options(cfg: ServeConfig) -> dict[str, Any]:
    p = cfg.pair
    tower = {"GPU": 1.0} if p.use_gpus else {"CPU": max(p.worker_cpus, 0.01)}
    return {
        "name": PAIR_DEPLOYMENT,
        "ray_actor_options": {"num_cpus": p.replica_cpus},
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "num_replicas": cfg.replicas,  # either a fixed count ...
        "autoscaling_config": cfg.autoscaling.to_serve() if cfg.replicas is None else None,  # ... or autoscaling
        "health_check_period_s": 10,
        "health_check_timeout_s": 30,
        # bundle 0: this replica; 1 and 2: the context and denoiser actors (tower_pair.py)
        "placement_group_bundles": [{"CPU": p.replica_cpus}, dict(tower), dict(tower)] if p.enabled else None,
        "placement_group_strategy": "STRICT_PACK" if p.enabled else None,
    }


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    cfg = ServeConfig.from_dict(dict(args or {}))

    @serve.deployment(name=INGRESS_DEPLOYMENT, max_ongoing_requests=10_000, ray_actor_options={"num_cpus": 0})
    @serve.ingress()
    class Ingress(GrpcIngress):
        """gRPC methods (GrpcIngress) and the OpenAI-compatible HTTP app on the same replicas."""

        def __init__(self, server_handle) -> None:
            self.client = HandleClient(server_handle)
            # backstop for cancellations Serve's proxy can lose (docs/grpc.md)
            GrpcIngress.__init__(self, self.client, default_deadline_s=cfg.request_timeout_s)

        def __serve_build_asgi_app__(self):
            return build_openai_app(self.client, cfg.served_model_name)

    opts = {k: v for k, v in pair_deployment_options(cfg).items() if v is not None}
    pair = serve.deployment(TowerPairServer).options(**opts)
    return Ingress.bind(pair.bind(cfg.to_dict()))


def start_serve(cfg: ServeConfig, host: str = "127.0.0.1", blocking: bool = False) -> None:
    """Start Serve's HTTP and gRPC proxies on this cluster and deploy the app."""
    serve.start(
        http_options={"host": host, "port": cfg.http_port},
        grpc_options={"port": cfg.grpc_port, "grpc_servicer_functions": grpc_servicer_functions()},
    )
    serve.run(build_app(cfg.to_dict()), name=cfg.app_name, route_prefix="/", blocking=blocking)
