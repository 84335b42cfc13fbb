"""The declarative Serve config (Ray's ServeDeploySchema) of a ServeConfig: what `serve deploy` and the
dashboard's REST API (PUT /api/serve/applications/) take, and what the Helm chart renders as
serveConfigV2. Scaling at run time = changing the TowerPair deployment's replica settings here and
PUTting the whole config again. Plain data and urllib: importing it starts no Ray, Serve or gRPC.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from twotower.cluster.actors.config import PLACEMENT_STRATEGY
from twotower.protos import ADD_SERVICER

from .config import ServeConfig

IMPORT_PATH = "twotower.cluster.serve.app:build_app"
PAIR_DEPLOYMENT = "TowerPair"
INGRESS_DEPLOYMENT = "Ingress"
HEALTH_ADD_SERVICER = "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server"


def grpc_servicer_functions() -> list[str]:
    """Import paths for Serve's `gRPCOptions.grpc_servicer_functions`: our service and grpc.health.v1."""
    return [ADD_SERVICER, HEALTH_ADD_SERVICER]


def pair_deployment_options(cfg: ServeConfig) -> dict[str, Any]:
    """The TowerPair deployment's options (None = Serve's default), as app.py binds them and as the
    declarative config lists them."""
    p = cfg.pair
    return {
        "name": PAIR_DEPLOYMENT,
        "ray_actor_options": {"num_cpus": p.replica_cpus},
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "max_queued_requests": cfg.max_queued_requests,
        "graceful_shutdown_timeout_s": cfg.drain_timeout_s,  # in-flight streams finish on scale-down
        "num_replicas": cfg.replicas,  # either a fixed count ...
        "autoscaling_config": cfg.autoscaling.to_serve() if cfg.replicas is None else None,  # ... or autoscaling
        "health_check_period_s": 10,
        "health_check_timeout_s": 30,
        # bundle 0: this replica; 1 and 2: the context and denoiser actors (actors/pair.py)
        "placement_group_bundles": p.bundles() if p.enabled else None,
        "placement_group_strategy": PLACEMENT_STRATEGY if p.enabled else None,
    }


def _tls_options(cfg: ServeConfig) -> dict[str, str]:
    """Serve's HTTPOptions for HTTPS (only the fields that are set)."""
    opts = {"ssl_certfile": cfg.tls_certfile, "ssl_keyfile": cfg.tls_keyfile, "ssl_ca_certs": cfg.tls_ca_certs}
    return {k: v for k, v in opts.items() if v is not None}


def serve_deploy_config(cfg: ServeConfig, host: str = "0.0.0.0") -> dict[str, Any]:
    pair = {k: v for k, v in pair_deployment_options(cfg).items() if v is not None}
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": host, "port": cfg.http_port, **_tls_options(cfg)},
        "grpc_options": {"port": cfg.grpc_port, "grpc_servicer_functions": grpc_servicer_functions()},
        "applications": [{
            "name": cfg.app_name,
            "route_prefix": "/",
            "import_path": IMPORT_PATH,
            "args": cfg.to_dict(),
            "deployments": [pair, {"name": INGRESS_DEPLOYMENT}],
        }],
    }  # fmt: skip


def set_replicas(config: dict[str, Any], app: str, replicas: int | None = None, min_replicas: int | None = None,
                 max_replicas: int | None = None) -> dict[str, Any]:  # fmt: skip
    """Change the tower-pair replica settings of `app` in a deploy config (in place; also returned).
    `replicas` fixes the count (autoscaling off); min/max set autoscaling bounds (autoscaling on).
    Both the app's args (what build_app reads) and the deployment's options are updated, validated
    through ServeConfig."""
    apps = [a for a in config.get("applications", []) if a.get("name") == app]
    if not apps:
        raise ValueError(f"app: no application named {app!r} in the deployed config")
    args = dict(apps[0].get("args") or {})
    if replicas is not None:
        args["replicas"] = replicas
    if min_replicas is not None or max_replicas is not None:
        auto = dict(args.get("autoscaling") or {})
        if min_replicas is not None:
            auto["min_replicas"] = min_replicas
        if max_replicas is not None:
            auto["max_replicas"] = max_replicas
        args["autoscaling"], args["replicas"] = auto, None
    cfg = ServeConfig.from_dict(args)  # raises ValueError naming a bad field
    apps[0]["args"] = cfg.to_dict()
    opts = pair_deployment_options(cfg)
    deps = [d for d in apps[0].get("deployments", []) if d.get("name") != PAIR_DEPLOYMENT]
    pair = {k: v for k, v in opts.items() if v is not None}
    apps[0]["deployments"] = [pair, *deps]
    return config


def _request(url: str, method: str = "GET", body: dict | None = None, token: str | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            text = r.read().decode()
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"{method} {url}: HTTP {e.code}: {e.read().decode()[:500]}") from e
    return json.loads(text) if text.strip() else None


def deployed_config(dashboard: str, token: str | None = None) -> dict[str, Any]:
    """The declarative config currently deployed (GET /api/serve/applications/)."""
    status = _request(f"{dashboard.rstrip('/')}/api/serve/applications/", token=token)
    apps = [a["deployed_app_config"] for a in status.get("applications", {}).values() if a.get("deployed_app_config")]
    if not apps:
        raise RuntimeError(f"{dashboard}: no application was deployed through a declarative config")
    cfg = {"applications": apps}
    for key in ("http_options", "grpc_options", "proxy_location"):
        if status.get(key):
            cfg[key] = status[key]
    return cfg


def put_config(dashboard: str, config: dict[str, Any], token: str | None = None) -> None:
    _request(f"{dashboard.rstrip('/')}/api/serve/applications/", "PUT", config, token)


def replica_counts(dashboard: str, app: str, token: str | None = None) -> dict[str, int]:
    """Running replicas per deployment of `app`."""
    status = _request(f"{dashboard.rstrip('/')}/api/serve/applications/", token=token)
    deps = status.get("applications", {}).get(app, {}).get("deployments", {})
    return {name: sum(1 for r in d.get("replicas", []) if r.get("state") == "RUNNING") for name, d in deps.items()}
