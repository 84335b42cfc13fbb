"""The declarative Serve config (Ray's ServeDeploySchema) of a ServeConfig: what `serve deploy` and the
dashboard's REST API (PUT /api/serve/applications/) take, and what the Helm chart renders as
serveConfigV2. Scaling at run time = changing the TowerPair deployment's replica settings here and
PUTting the whole config again.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from .app import INGRESS_DEPLOYMENT, PAIR_DEPLOYMENT, pair_deployment_options
from .grpc_ingress import grpc_servicer_functions
from .serve_config import ServeConfig

IMPORT_PATH = "twotower.cluster.app:build_app"


def serve_deploy_config(cfg: ServeConfig, host: str = "0.0.0.0") -> dict[str, Any]:
    pair = {k: v for k, v in pair_deployment_options(cfg).items() if v is not None}
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": host, "port": cfg.http_port},
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
