"""`twotower serve` and `twotower scale`.

`serve` starts its own local Ray (dashboard on 127.0.0.1, metrics on the configured port, Ray's token
auth on as Ray 2.60 sets it for a new local cluster) unless `--address` (or RAY_ADDRESS) names a
cluster to join; deploys the app through the dashboard's Serve REST API with the cluster token; waits
until every deployment runs; then, in the foreground, logs a throughput line every STATS_INTERVAL_S.
`scale` changes only the tower-pair replica settings of the deployed config (a lightweight update).
Every dashboard call carries the token (serve.deploy reads it).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import socket
import sys
import threading
import time

from .errors import fail

RAY_CONNECT_TIMEOUT_S = 30.0  # joining a cluster: a dead or stale address ends here with a message
STATS_INTERVAL_S = 10.0


def add_serve_args(s: argparse.ArgumentParser) -> None:
    from twotower.cluster.serve.config import ServeConfig

    d = ServeConfig()
    s.add_argument("model_arg", nargs="?", metavar="MODEL", default=None, help="checkpoint directory (same as --model)")
    s.add_argument("--model", default=None, help="checkpoint directory (default: the bundled model)")
    s.add_argument("--config", default=None, help="ServeConfig as YAML or JSON; flags override its fields")
    s.add_argument("--address", default=None, help="join this Ray cluster (or RAY_ADDRESS) instead of starting a "
                   "local one")  # fmt: skip
    s.add_argument("--host", default=None, help=f"address the HTTP proxy binds (default: {d.host})")
    s.add_argument("--http-port", type=int, default=None, help=f"OpenAI-compatible HTTP (default: {d.http_port})")
    s.add_argument("--grpc-port", type=int, default=None, help=f"gRPC twotower.v1 (default: {d.grpc_port})")
    s.add_argument("--metrics-port", type=int, default=None, help=f"Prometheus metrics of the local Ray node "
                   f"(default: {d.metrics_port})")  # fmt: skip
    s.add_argument("--max-model-len", type=int, default=None, help=f"prompt + completion tokens per request "
                   f"(default: {d.engine.max_model_len})")  # fmt: skip
    s.add_argument("--served-model-name", default=None, help=f"the model name of the OpenAI API "
                   f"(default: {d.served_model_name})")  # fmt: skip
    s.add_argument("--eager", action="store_true", help="eager tower steps (engine.eager: true): starts in seconds "
                   "on a CPU; the default compiles each tower's steps first")  # fmt: skip
    s.add_argument("--no-prefix-cache", action="store_true", help="turn the prefix cache off (engine.prefix_cache: "
                   "false)")  # fmt: skip
    s.add_argument("--prefix-cache-bytes", type=int, default=None, help="the prefix cache's memory budget "
                   f"(default: {d.engine.prefix_cache_bytes})")  # fmt: skip
    s.add_argument("--dashboard-port", type=int, default=8265, help="the local Ray's dashboard (Serve REST API)")
    s.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for the app to start (compiled "
                   "steps warm up first)")  # fmt: skip
    s.add_argument("--block", action="store_true", help="stay in the foreground on a joined cluster too")


def serve_config(a: argparse.Namespace):
    """The ServeConfig of --config with the flags applied (each flag mirrors one field)."""
    from twotower.cluster.engine.loading import resolve_model
    from twotower.cluster.serve.config import ServeConfig

    cfg = ServeConfig.from_file(a.config) if a.config else ServeConfig()
    flags = {"host": a.host, "http_port": a.http_port, "grpc_port": a.grpc_port, "metrics_port": a.metrics_port,
             "served_model_name": a.served_model_name, "model": a.model or a.model_arg}  # fmt: skip
    cfg = dataclasses.replace(cfg, **{k: v for k, v in flags.items() if v is not None})  # validated again
    engine = {"max_model_len": a.max_model_len, "eager": True if a.eager else None,
              "prefix_cache": False if a.no_prefix_cache else None, "prefix_cache_bytes": a.prefix_cache_bytes}
    engine = {k: v for k, v in engine.items() if v is not None}
    if engine:
        cfg = dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, **engine))
    return dataclasses.replace(cfg, model=str(resolve_model(cfg.model).resolve()))


def _check_ports_free(cfg, dashboard_port: int) -> None:
    """A port another process holds would leave a proxy or the dashboard down without a word."""
    for flag, port, host in (("--http-port", cfg.http_port, cfg.host), ("--grpc-port", cfg.grpc_port, "0.0.0.0"),
                             ("--metrics-port", cfg.metrics_port, "0.0.0.0"),
                             ("--dashboard-port", dashboard_port, "127.0.0.1")):  # fmt: skip
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError as e:
                fail(f"port {port} ({flag}) is in use on this machine ({e.strerror}); pick another, or stop what "
                     f"holds it (another `twotower serve`? `ray stop`)")  # fmt: skip


def within(seconds: float, what: str, connect):
    """connect() in a helper thread, so that a dead or stale GCS address (which ray.init retries without
    end, ignoring Ctrl-C) ends in a message and exit status 1 after `seconds`."""
    out: dict = {}

    def run() -> None:
        try:
            out["ctx"] = connect()
        except BaseException as e:  # re-raised in the caller's thread
            out["error"] = e

    t = threading.Thread(target=run, name="ray-connect", daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        print(f"error: could not reach {what} within {seconds:.0f} s (a stopped cluster or a stale address? "
              f"check --address / RAY_ADDRESS, or `ray stop` and retry)", file=sys.stderr, flush=True)  # fmt: skip
        os._exit(1)  # the connecting thread is stuck inside Ray: a normal exit would wait for it
    if "error" in out:
        raise out["error"]
    return out["ctx"]


def _loopback_only_ray() -> None:
    """A local Ray for one machine: its node address is 127.0.0.1, so GCS, raylet, workers, object
    manager and agents listen on loopback only (by default Ray takes the machine's address and its core
    servers listen on every interface). RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is Ray's switch for that
    (the single-machine mode of macOS and Windows); it is read when ray is imported, so it is set in the
    environment (for Ray's processes) and on the imported constant (for this one)."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def connect_ray(address: str | None, cfg, dashboard_port: int):
    """(Ray context, started here): join `address` / RAY_ADDRESS, or start a local Ray."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    target = address or os.environ.get("RAY_ADDRESS")
    if target:
        return within(RAY_CONNECT_TIMEOUT_S, f"Ray at {target}", lambda: ray.init(address=target)), False
    _check_ports_free(cfg, dashboard_port)
    _loopback_only_ray()
    # in the main thread: Ray's processes die with the thread that started them (PR_SET_PDEATHSIG is
    # per thread), so a helper thread like within()'s would take the new cluster down when it ends
    ctx = ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1",
                   dashboard_port=dashboard_port, _metrics_export_port=cfg.metrics_port)  # fmt: skip
    return ctx, True


def _stop_on_sigterm() -> None:
    """SIGTERM from a script stops `serve` the way Ctrl-C does (and so shuts a local Ray down)."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def cmd_serve(a: argparse.Namespace) -> int:
    from twotower.cluster.serve.deploy import put_config, scaling_of, serve_deploy_config

    try:
        cfg = serve_config(a)
    except (ValueError, FileNotFoundError, OSError) as e:
        fail(str(e), 2)
    _stop_on_sigterm()
    try:
        ctx, started = connect_ray(a.address, cfg, a.dashboard_port)
    except (ConnectionError, RuntimeError, ValueError) as e:
        joining = a.address or os.environ.get("RAY_ADDRESS")
        fail(f"{e} (check --address / RAY_ADDRESS)" if joining else f"could not start a local Ray: {e}")
    except KeyboardInterrupt:  # Ctrl-C / SIGINT / SIGTERM while connecting: stop now, whatever Ray's thread does
        print("interrupted", file=sys.stderr, flush=True)
        os._exit(130)
    if not ctx.dashboard_url:
        fail("the Ray dashboard did not start (it serves the REST API that deploys the app); its log is "
             "/tmp/ray/session_latest/logs/dashboard.log")  # fmt: skip
    dashboard = "http://" + ctx.dashboard_url
    import ray

    cfg = cfg.fit_to(ray.cluster_resources())  # an open autoscaling bound: as many pairs as the cluster holds
    try:
        deploy = serve_deploy_config(cfg)
        put_config(dashboard, deploy)  # with the cluster's token (serve.deploy reads it)
        pairs = " ".join(f"{k}={v}" for k, v in scaling_of(deploy, cfg.app_name).items())
        print(f"deploying {cfg.app_name} (model {cfg.model}, tower pairs {pairs}) ...", file=sys.stderr)
        if not cfg.engine.eager and cfg.engine.warmup:
            where = "GPUs" if cfg.pair.use_gpus else ("CPUs (about 13 min for the bundled model on 2 cores when "
                                                      "TorchInductor's cache is empty, 1 min when it is filled)")
            print(f"each tower actor compiles its start-up steps before serving, on {where}; progress is in the "
                  f"actors' logs (dashboard); engine.eager: true skips it", file=sys.stderr)  # fmt: skip
        counts = _wait_running(dashboard, cfg.app_name, a.timeout)
        print(f"serving {cfg.served_model_name}: HTTP http://{cfg.host}:{cfg.http_port}/v1  gRPC "
              f"{cfg.host}:{cfg.grpc_port}  metrics :{cfg.metrics_port}/metrics  dashboard {dashboard}  "
              f"replicas {counts}", file=sys.stderr, flush=True)  # fmt: skip
        if not started and not a.block:
            return 0
        _log_throughput(dashboard, cfg.app_name)
    except KeyboardInterrupt:
        print("stopping", file=sys.stderr, flush=True)
        return 0
    except RuntimeError as e:
        fail(str(e))
    return 0


def _wait_running(dashboard: str, app: str, timeout_s: float) -> dict[str, int]:
    from twotower.cluster.serve.deploy import replica_counts

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        try:
            counts = replica_counts(dashboard, app)
        except RuntimeError:
            counts = {}
        if counts and all(n > 0 for n in counts.values()):
            return counts
        time.sleep(1)
    raise RuntimeError(f"the app did not start within {timeout_s:.0f} s (the replicas' logs are in the dashboard)")


def _log_throughput(dashboard: str, app: str) -> None:
    """Every STATS_INTERVAL_S, one line from the same metrics Prometheus scrapes (until Ctrl-C)."""
    import asyncio

    from twotower.cluster.serve.deploy import replica_counts
    from twotower.cluster.serve.metrics_scrape import scrape, totals

    from .throughput import ThroughputLine

    line = ThroughputLine()
    while True:
        time.sleep(STATS_INTERVAL_S)
        try:
            sums = totals(asyncio.run(scrape()))
            pairs = replica_counts(dashboard, app).get("TowerPair", 0)
        except (OSError, RuntimeError) as e:
            print(f"stats: {e}", file=sys.stderr, flush=True)
            continue
        text = line.update(sums, time.monotonic(), pairs)
        if text:
            print(text, file=sys.stderr, flush=True)


def add_scale_args(c: argparse.ArgumentParser) -> None:
    c.add_argument("--dashboard", default="http://127.0.0.1:8265", help="the Ray dashboard (Serve REST API)")
    c.add_argument("--app", default="twotower")
    c.add_argument("--replicas", type=int, default=None, help="a fixed number of tower pairs (an autoscaled "
                   "app keeps autoscaling, with bounds N..N)")  # fmt: skip
    c.add_argument("--min-replicas", type=int, default=None, help="autoscaling lower bound (autoscaling on)")
    c.add_argument("--max-replicas", type=int, default=None, help="autoscaling upper bound (autoscaling on)")
    c.add_argument("--token", default=None, help="Ray auth token (default: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH "
                   "or ~/.ray/auth_token)")  # fmt: skip


def cmd_scale(a: argparse.Namespace) -> int:
    """With no flags: the current settings and running counts. Otherwise a lightweight update."""
    from twotower.cluster.serve.deploy import deployed_config, put_config, replica_counts, scaling_of, set_replicas

    try:
        cfg = deployed_config(a.dashboard, a.token)
        if a.replicas is None and a.min_replicas is None and a.max_replicas is None:
            settings = " ".join(f"{k}={v}" for k, v in scaling_of(cfg, a.app).items())
            print(f"{a.app}: {settings}; running {replica_counts(a.dashboard, a.app, a.token)}")
            return 0
        set_replicas(cfg, a.app, a.replicas, a.min_replicas, a.max_replicas)
        put_config(a.dashboard, cfg, a.token)
    except (RuntimeError, ValueError) as e:
        fail(str(e))
    settings = " ".join(f"{k}={v}" for k, v in scaling_of(cfg, a.app).items())
    print(f"{a.app}: tower pairs set to {settings} (running replicas keep running)")
    return 0
