"""The declarative Serve config (Ray's ServeDeploySchema) of a ServeConfig: what `serve deploy` and the
dashboard's REST API (PUT /api/serve/applications/) take, and what the Helm chart renders as
serveConfigV2. Scaling at run time = changing only the TowerPair deployment's replica settings in the
deployed config and PUTting it again (a lightweight update: no replica restarts). Plain data and
urllib: importing it starts no Ray, Serve or gRPC.
"""

from __future__ import annotations

import dataclasses
import json
import urllib.error
import urllib.request
from typing import Any

from twotower.cluster.actors.config import PLACEMENT_STRATEGY

from .config import AutoscalingSettings, ServeConfig

IMPORT_PATH = "twotower.cluster.serve.app:build_app"
PAIR_DEPLOYMENT = "TowerPair"
ROUTER_CLASS_PATH = "twotower.cluster.serve.prefix_router:PrefixAffinityRouter"  # importing it needs Ray
INGRESS_DEPLOYMENT = "Ingress"
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
        "request_router_config": _router_config(cfg),
    }


def _router_config(cfg: ServeConfig) -> dict[str, Any] | None:
    """Serve's RequestRouterConfig of the TowerPair deployment (None: Serve's power-of-two default)."""
    if cfg.request_router != "prefix_affinity":
        return None
    kwargs = {"model": cfg.model, "grid": cfg.engine.prefix_cache_grid, "imbalance": cfg.affinity_imbalance}
    return {"request_router_class": ROUTER_CLASS_PATH, "request_router_kwargs": kwargs}


def _tls_options(cfg: ServeConfig) -> dict[str, str]:
    """Serve's HTTPOptions for HTTPS (only the fields that are set)."""
    opts = {"ssl_certfile": cfg.tls_certfile, "ssl_keyfile": cfg.tls_keyfile, "ssl_ca_certs": cfg.tls_ca_certs}
    return {k: v for k, v in opts.items() if v is not None}


def serve_deploy_config(cfg: ServeConfig) -> dict[str, Any]:
    pair = {k: v for k, v in pair_deployment_options(cfg).items() if v is not None}
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": cfg.host, "port": cfg.http_port, **_tls_options(cfg)},
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
    """Change the tower-pair replica settings of `app` in a deploy config (in place; also returned):
    `replicas` a fixed count, min/max autoscaling bounds.

    Only the TowerPair deployment's `num_replicas` or `autoscaling_config` bounds change, never the app's
    args or whether it autoscales: those make Serve's code version of the app (Ray 2.60 hashes the args
    and which deployments carry an autoscaling_config), and a new code version rebuilds the app and
    restarts every replica. So on an autoscaled app (the default) a fixed count is the bounds N..N, and
    an app deployed with a fixed count takes only a new count. Serve applies the change as a
    lightweight update: running replicas go on, and on scale-down those that go drain first."""
    if replicas is None and min_replicas is None and max_replicas is None:
        raise ValueError("replicas: nothing to change (give replicas, or min_replicas / max_replicas)")
    if replicas is not None and (min_replicas is not None or max_replicas is not None):
        raise ValueError("replicas: a fixed count and autoscaling bounds exclude each other")
    if replicas is not None and (not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 1):
        raise ValueError(f"replicas: must be an integer >= 1 (got {replicas!r}); to let the pairs go to zero "
                         f"when idle, set min_replicas 0")  # fmt: skip
    apps = [a for a in config.get("applications", []) if a.get("name") == app]
    if not apps:
        raise ValueError(f"app: no application named {app!r} in the deployed config")
    built = ServeConfig.from_dict(dict(apps[0].get("args") or {}))  # what the app's code was built with
    deps = apps[0].setdefault("deployments", [])
    pair = next((d for d in deps if d.get("name") == PAIR_DEPLOYMENT), None)
    if pair is None:
        pair = {"name": PAIR_DEPLOYMENT}
        deps.insert(0, pair)
    auto = pair.get("autoscaling_config")
    if not isinstance(auto, dict):  # deployed with a fixed count
        if replicas is None:
            raise ValueError(f"min_replicas / max_replicas: {app!r} runs a fixed number of tower pairs "
                             f"(replicas: {built.replicas}); autoscaling needs a new deploy with replicas: null "
                             f"(which restarts its replicas); here only --replicas can change")  # fmt: skip
        pair["num_replicas"] = replicas
        return config
    auto = dict(auto)
    if replicas is not None:
        lo, hi = replicas, replicas
    else:
        lo = auto.get("min_replicas", 1) if min_replicas is None else min_replicas
        hi = auto.get("max_replicas") if max_replicas is None else max_replicas
    auto["min_replicas"], auto["max_replicas"] = lo, hi
    if auto.get("initial_replicas") is not None:  # only read at the first deploy; keep it within the bounds
        auto["initial_replicas"] = min(max(auto["initial_replicas"], lo), hi)
    known = {f.name for f in dataclasses.fields(AutoscalingSettings)}
    AutoscalingSettings(**{k: v for k, v in auto.items() if k in known}).validate()  # names the bad field
    pair["autoscaling_config"] = auto
    return config


def scaling_of(config: dict[str, Any], app: str) -> dict[str, Any]:
    """The tower-pair replica settings `app` runs with: {"replicas": N} (a fixed count, or autoscaling
    bounds N..N) or {"min_replicas", "max_replicas"}."""
    apps = [a for a in config.get("applications", []) if a.get("name") == app]
    if not apps:
        raise ValueError(f"app: no application named {app!r} in the deployed config")
    pair = next((d for d in apps[0].get("deployments", []) if d.get("name") == PAIR_DEPLOYMENT), {})
    auto = pair.get("autoscaling_config")
    if isinstance(auto, dict):
        lo, hi = auto.get("min_replicas"), auto.get("max_replicas")
        return {"replicas": lo} if lo == hi else {"min_replicas": lo, "max_replicas": hi}
    if isinstance(pair.get("num_replicas"), int):
        return {"replicas": pair["num_replicas"]}
    built = ServeConfig.from_dict(dict(apps[0].get("args") or {}))
    if built.replicas is not None:
        return {"replicas": built.replicas}
    return {"min_replicas": built.autoscaling.min_replicas, "max_replicas": built.autoscaling.max_replicas}


def ray_auth_token() -> str | None:
    """The Ray cluster token this process uses (RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH names, or
    ~/.ray/auth_token, where `ray.init` writes the one it generates for a new local cluster), or None
    when Ray auth is off. Every dashboard call below sends it unless given another."""
    import os
    from pathlib import Path

    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    return path.read_text().strip() if path.is_file() else None


def _request(url: str, method: str = "GET", body: dict | None = None, token: str | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    token = token or ray_auth_token()
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            text = r.read().decode()
    except urllib.error.HTTPError as e:
        hint = " (the Ray auth token: --token, RAY_AUTH_TOKEN or ~/.ray/auth_token)" if e.code in (401, 403) else ""
        raise RuntimeError(f"{method} {url}: HTTP {e.code}: {e.read().decode()[:500]}{hint}") from e
    except (urllib.error.URLError, OSError) as e:  # refused, unreachable, timed out, a bad URL
        reason = getattr(e, "reason", e)
        raise RuntimeError(f"cannot reach the Ray dashboard at {url.split('/api/')[0]}: {reason}") from e
    except ValueError as e:  # urllib's "unknown url type"
        raise RuntimeError(f"{url}: {e}") from e
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


def replica_ids(dashboard: str, app: str, token: str | None = None) -> dict[str, set[str]]:
    """The ids of the running replicas per deployment of `app`: a replica that was restarted comes back
    under a new id."""
    status = _request(f"{dashboard.rstrip('/')}/api/serve/applications/", token=token)
    deps = status.get("applications", {}).get(app, {}).get("deployments", {})
    return {name: {r["replica_id"] for r in d.get("replicas", []) if r.get("state") == "RUNNING"}
            for name, d in deps.items()}  # fmt: skip

