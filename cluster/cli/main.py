"""`twotower` command line: generate, eval, serve, scale, bench-serve. Each command imports what it needs
when it runs, so `twotower scale` never loads torch's towers or Ray Serve."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from twotower.cluster.engine.config import DTYPES  # plain dataclasses: importing them loads no torch
from twotower.cluster.engine.params import MODES, SamplingParams


def _model_path(arg: str | None) -> Path:
    from twotower.cluster.engine.loading import resolve_model

    try:
        return resolve_model(arg)
    except FileNotFoundError as e:
        sys.exit(f"error: {e}")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    d = SamplingParams()  # the one home of the defaults
    p.add_argument("--mode", default=d.mode, choices=MODES)
    p.add_argument("--max-tokens", type=int, default=d.max_tokens)
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--top-k", type=int, default=d.top_k)
    p.add_argument("--top-p", type=float, default=d.top_p)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--block-size", type=int, default=d.block_size)
    p.add_argument("--steps-per-block", type=int, default=d.steps_per_block)
    p.add_argument("--gamma", type=float, default=d.gamma)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")


def _sampling(a: argparse.Namespace) -> SamplingParams:
    return SamplingParams(mode=a.mode, max_tokens=a.max_tokens, temperature=a.temperature, top_k=a.top_k,
                          top_p=a.top_p, seed=a.seed, block_size=a.block_size, steps_per_block=a.steps_per_block,
                          gamma=a.gamma, stop=a.stop, ignore_eos=a.ignore_eos)  # fmt: skip


def cmd_generate(a: argparse.Namespace) -> int:
    from twotower.cluster.engine.config import EngineConfig
    from twotower.cluster.engine.loading import build_engine, load_model, torch_threads

    torch_threads(a.threads)
    t0 = time.perf_counter()
    model = load_model(_model_path(a.model), a.device, a.dtype)
    # eager unless --compile: compiling costs seconds per step kind and bucket on a CPU (warmed lazily
    # here, since one request uses few of them)
    engine = build_engine(model, EngineConfig(device=a.device, dtype=a.dtype, eager=not a.compile, warmup=False))
    load_s = time.perf_counter() - t0
    try:
        req = engine.add_request(a.prompt, _sampling(a))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t1 = time.perf_counter()
    text = []
    while not req.finished:
        for out in engine.step():
            if out.request_id == req.request_id:
                text.append(out.text)
                if not a.quiet:
                    print(out.text, end="", flush=True)
    gen_s = time.perf_counter() - t1
    if a.quiet:
        print("".join(text), end="")
    u = req.usage
    print(
        f"\n--\nmode={a.mode} tokens={u.completion_tokens} finish={req.finish_reason.value} "
        f"denoiser_forwards={u.denoiser_forwards} context_forwards={u.context_forwards} "
        f"tokens/forward={u.tokens_per_forward:.2f} (denoiser {u.tokens_per_denoiser_forward:.2f}, "
        f"context {u.tokens_per_context_forward:.2f}) tokens/s={u.completion_tokens / gen_s:.1f} "
        f"load={load_s:.2f}s seed={req.seed}",
        file=sys.stderr,
    )
    return 0


def _connect_ray(address: str | None, dashboard_port: int):
    """Connect to a running Ray cluster, or start a local one (with the dashboard, which serves the
    REST API used for deploying and scaling) when none is running."""
    import os

    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address or os.environ.get("RAY_ADDRESS"):
        target = address or os.environ["RAY_ADDRESS"]
        return _within(RAY_CONNECT_TIMEOUT_S, f"Ray at {target}", lambda: ray.init(address=target)), False
    try:
        return _within(RAY_CONNECT_TIMEOUT_S, "the running Ray cluster", lambda: ray.init(address="auto")), False
    except ConnectionError:
        return ray.init(include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=dashboard_port), True


RAY_CONNECT_TIMEOUT_S = 30.0


def ray_auth_token() -> str | None:
    """The Ray cluster token this process uses (RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH names, or
    ~/.ray/auth_token, where `ray.init` writes the one it generates), or None when Ray auth is off."""
    import os
    from pathlib import Path

    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    return path.read_text().strip() if path.is_file() else None


def _within(seconds: float, what: str, connect):
    """connect() in a helper thread, so that a dead or stale GCS address (which ray.init retries without
    end, ignoring Ctrl-C) ends in a message and exit status 1 after `seconds`."""
    import os
    import threading

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


def _serve_config(a: argparse.Namespace):
    from twotower.cluster.serve.config import ServeConfig

    cfg = ServeConfig.from_file(a.config) if a.config else ServeConfig()
    if a.model:
        cfg.model = a.model
    cfg.model = str(_model_path(cfg.model).resolve())
    return cfg


def cmd_eval(a: argparse.Namespace) -> int:
    from twotower.cluster.engine.config import EngineConfig
    from twotower.cluster.engine.loading import build_engine, load_model, torch_threads

    from . import evaluation as ev

    torch_threads(a.threads)
    path = _model_path(a.model)
    engine = build_engine(load_model(path), EngineConfig(max_num_seqs=max(64, a.prompts), eager=True))
    prompts = ev.heldout_prompts(a.prompts, seed=a.seed)
    print(f"model {path}: {len(prompts)} held-out prompts, max_tokens {a.max_tokens}", file=sys.stderr)
    configs = ev.grid(a.block_sizes, a.gammas, a.max_tokens, tuple(a.few_steps))
    rows = ev.evaluate(engine, prompts, configs, a.speed_prompts,
                       log=lambda m: print(m, file=sys.stderr))  # fmt: skip
    text = ev.table(rows)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    if a.png:
        ev.plot(rows, a.png, f"{path.name}: {len(prompts)} held-out prompts")
        print(f"plot: {a.png}", file=sys.stderr)
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    from twotower.cluster.serve.deploy import put_config, replica_counts, serve_deploy_config

    try:
        cfg = _serve_config(a)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        ctx, started = _connect_ray(a.address, a.dashboard_port)
    except ConnectionError as e:
        print(f"error: {e} (check --address / RAY_ADDRESS)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # SIGINT / Ctrl-C while connecting: stop now, whatever Ray's thread does
        print("interrupted", file=sys.stderr, flush=True)
        import os

        os._exit(130)
    dashboard = "http://" + (ctx.dashboard_url or f"127.0.0.1:{a.dashboard_port}")
    token = ray_auth_token()  # Ray 2.60 turns token auth on for a new local cluster: the dashboard needs it
    put_config(dashboard, serve_deploy_config(cfg, host=a.host), token)
    print(f"deploying {cfg.app_name} (model {cfg.model}) ...", file=sys.stderr)
    if not cfg.engine.eager and cfg.engine.warmup:
        where = "GPUs" if cfg.pair.use_gpus else ("CPUs (about 13 min for the bundled model on 2 cores when "
                                                  "TorchInductor's cache is empty, 1 min when it is filled)")
        print(f"each tower actor compiles its start-up steps before serving, on {where}; progress is in the "
              f"actors' logs (dashboard); engine.eager: true skips it", file=sys.stderr)  # fmt: skip
    t0 = time.monotonic()
    while time.monotonic() - t0 < a.timeout:
        try:
            counts = replica_counts(dashboard, cfg.app_name, token)
        except RuntimeError:
            counts = {}
        if counts and all(n > 0 for n in counts.values()):
            break
        time.sleep(1)
    else:
        print(f"error: the app did not start within {a.timeout} s", file=sys.stderr)
        return 1
    print(f"serving {cfg.served_model_name}: HTTP http://{a.host}:{cfg.http_port}/v1  gRPC {a.host}:{cfg.grpc_port}  "
          f"dashboard {dashboard}  replicas {counts}", file=sys.stderr)  # fmt: skip
    if not started and not a.block:
        return 0
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0


def cmd_scale(a: argparse.Namespace) -> int:
    from twotower.cluster.serve.deploy import deployed_config, put_config, set_replicas

    try:
        token = a.token or ray_auth_token()
        cfg = set_replicas(deployed_config(a.dashboard, token), a.app, a.replicas, a.min_replicas, a.max_replicas)
        put_config(a.dashboard, cfg, token)
    except (RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{a.app}: tower-pair replicas set (replicas={a.replicas}, min={a.min_replicas}, max={a.max_replicas})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="twotower", description="Two-tower block-diffusion LM serving")
    sub = parser.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="generate a completion in-process and print per-request stats")
    g.add_argument("prompt")
    g.add_argument("--model", default=None, help="checkpoint directory (default: the bundled model)")
    g.add_argument("--device", default="cpu")
    g.add_argument("--dtype", default=None, choices=DTYPES, help="default: float32 on CPU, else the checkpoint's")
    g.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    g.add_argument("--quiet", action="store_true", help="print the text at the end, not streamed")
    g.add_argument("--compile", action="store_true", help="compiled tower steps (engine/steps.py) instead of eager")
    _add_sampling_args(g)
    g.set_defaults(fn=cmd_generate)

    e = sub.add_parser("eval", help="throughput / quality trade-off on held-out Python files (table + PNG)")
    e.add_argument("--model", default=None)
    e.add_argument("--prompts", type=int, default=48)
    e.add_argument("--max-tokens", type=int, default=48)
    e.add_argument("--block-sizes", type=int, nargs="+", default=[4, 8, 16, 32])
    e.add_argument("--gammas", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9, 0.95, 0.99])
    e.add_argument("--few-steps", type=int, nargs="*", default=[4, 2], help="also diffusion at gamma 0.8 with "
                   "these steps per block T < S (the fixed-k end)")  # fmt: skip
    e.add_argument("--speed-prompts", type=int, default=6, help="prompts timed at batch 1 per config")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--threads", type=int, default=None)
    e.add_argument("--out", default=None, help="write the table (markdown) here")
    e.add_argument("--png", default=None, help="write the trade-off plot here")
    e.set_defaults(fn=cmd_eval)

    s = sub.add_parser("serve", help="serve the model (HTTP OpenAI-compatible + gRPC) on Ray Serve")
    s.add_argument("--model", default=None, help="checkpoint directory (default: the bundled model)")
    s.add_argument("--config", default=None, help="ServeConfig as YAML or JSON")
    s.add_argument("--address", default=None, help="Ray cluster address (default: running one, else local)")
    s.add_argument("--host", default="127.0.0.1", help="address the HTTP and gRPC proxies bind")
    s.add_argument("--dashboard-port", type=int, default=8265)
    s.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for the app to start (compiled "
                   "steps warm up first)")  # fmt: skip
    s.add_argument("--block", action="store_true", help="stay in the foreground on an existing cluster too")
    s.set_defaults(fn=cmd_serve)

    c = sub.add_parser("scale", help="change the number of tower pairs through the dashboard's REST API")
    c.add_argument("--dashboard", default="http://127.0.0.1:8265")
    c.add_argument("--app", default="twotower")
    c.add_argument("--replicas", type=int, default=None, help="fixed number of pairs (autoscaling off)")
    c.add_argument("--min-replicas", type=int, default=None, help="autoscaling lower bound")
    c.add_argument("--max-replicas", type=int, default=None, help="autoscaling upper bound")
    c.add_argument("--token", default=None, help="Ray auth token (default: RAY_AUTH_TOKEN or ~/.ray/auth_token)")
    c.set_defaults(fn=cmd_scale)
    b = sub.add_parser("bench-serve", help="gRPC load generator with a concurrency sweep")
    b.add_argument("--target", default="127.0.0.1:9000")
    b.add_argument("--app", default="twotower")
    b.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    b.add_argument("--requests", type=int, default=16, help="requests per concurrency level (at least C)")
    d = SamplingParams()
    b.add_argument("--mode", default=d.mode, choices=MODES)
    b.add_argument("--max-tokens", type=int, default=64, help="per request (the benchmark's workload)")
    b.add_argument("--block-size", type=int, default=d.block_size)
    b.add_argument("--gamma", type=float, default=d.gamma)
    b.add_argument("--ignore-eos", action="store_true")
    b.add_argument("--slo-ttft", type=float, default=1.0, help="goodput SLO on time to first token (s)")
    b.add_argument("--slo-itl", type=float, default=0.5, help="goodput SLO on mean inter-block latency (s)")
    b.add_argument("--in-process", default=None, metavar="MODEL", help="also time an in-process engine")
    b.set_defaults(fn=lambda a: __import__("twotower.cluster.cli.bench_serve", fromlist=["main"]).main(a))

    a = parser.parse_args(argv)
    return a.fn(a)


if __name__ == "__main__":
    sys.exit(main())
