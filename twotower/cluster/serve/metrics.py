"""Serving metrics through Ray's metrics API (exported by Ray in Prometheus format).

`METRICS` lists every family this app defines, by the name given to Ray's metrics API; Ray's exporter
prefixes each with `ray_`, so Prometheus scrapes `ray_twotower_...` (`SCRAPED_PREFIX`), from every node's
metrics export port (ServeConfig.metrics_port) and from `/metrics` on the HTTP port (serve/app.py).
Latencies are histograms in seconds. Gauges are set after every engine step and when the engine goes
idle, so an idle replica reports 0 running, 0 waiting and 0 tokens/s.
"""

from __future__ import annotations

from ray.util import metrics as m

_LAT = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]
_TPF = [0.5, 1, 1.5, 2, 3, 4, 6, 8, 12, 16]
SCRAPED_PREFIX = "ray_"  # what Ray's Prometheus exporter puts before every application metric

# name -> (kind, help, tag keys)
METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "twotower_time_to_first_token_s": ("histogram", "time to first token", ("model",)),
    "twotower_inter_block_latency_s": ("histogram", "time between streamed deltas", ("model",)),
    "twotower_request_latency_s": ("histogram", "request latency", ("model",)),
    "twotower_generated_tokens_total": ("counter", "generated tokens", ("model",)),
    "twotower_requests_total": ("counter", "finished requests", ("model", "finish_reason")),
    "twotower_tokens_per_forward": ("histogram", "tokens per forward of either tower, per request", ("model",)),
    "twotower_tokens_per_denoiser_forward": ("histogram", "tokens per denoiser forward, per request", ("model",)),
    "twotower_tokens_per_context_forward": ("histogram", "tokens per context-tower forward, per request",
                                            ("model",)),  # fmt: skip
    "twotower_denoise_steps_per_block": ("histogram", "denoiser steps per block", ("model",)),
    "twotower_state_bytes_per_block": ("histogram", "state delta bytes sent to the denoiser", ("model",)),
    "twotower_state_transfer_ms": ("histogram", "state delta transfer time", ("model",)),
    "twotower_tokens_per_s": ("gauge", "generated tokens per second (last engine step; 0 when idle)", ("model",)),
    "twotower_queue_depth": ("gauge", "requests waiting for a slot", ("model",)),
    "twotower_active_requests": ("gauge", "requests being decoded", ("model",)),
    "twotower_errors_total": ("counter", "errors answered, by API and status code", ("api", "code")),
    "twotower_migrations_total": ("counter", "streams moved to another tower pair after theirs died", ("model",)),
    "twotower_prefix_cache_queries_total": ("counter", "prompts looked up in the prefix cache", ("model",)),
    "twotower_prefix_cache_hit_tokens_total": ("counter", "prompt tokens seated from the prefix cache", ("model",)),
    "twotower_prefix_cache_prefill_tokens_total": ("counter", "prompt tokens the context tower read (hits excluded)",
                                                   ("model",)),  # fmt: skip
    "twotower_prefix_cache_evictions_total": ("counter", "prefix-cache entries evicted", ("model",)),
    "twotower_prefix_cache_bytes_used": ("gauge", "bytes the prefix cache's entries take", ("model",)),
    "twotower_prefix_cache_budget_bytes": ("gauge", "the prefix cache's memory budget", ("model",)),
}
# exported from the first event on (Ray has no zero counter)
EVENT_ONLY = {"twotower_migrations_total", "twotower_prefix_cache_hit_tokens_total",
              "twotower_prefix_cache_evictions_total"}  # fmt: skip
_BUCKETS = {"twotower_tokens_per_forward": _TPF, "twotower_tokens_per_denoiser_forward": _TPF,
            "twotower_tokens_per_context_forward": [1, 2, 4, 8, 12, 16, 24, 32, 48, 64],
            "twotower_denoise_steps_per_block": [1, 2, 3, 4, 6, 8, 12, 16, 32],
            "twotower_state_bytes_per_block": [1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9],
            "twotower_state_transfer_ms": [0.1, 0.5, 1, 2, 5, 10, 25, 50, 100, 250]}  # fmt: skip


def make(name: str):
    """The Ray metric object of `METRICS[name]`."""
    kind, desc, tags = METRICS[name]
    if kind == "histogram":
        return m.Histogram(name, desc, _BUCKETS.get(name, _LAT), tags)
    return (m.Counter if kind == "counter" else m.Gauge)(name, desc, tags)


class ErrorCounter:
    """Counts the errors both ingresses answer (registered in ingress.errors.ERROR_HOOKS)."""

    def __init__(self) -> None:
        self.counter = make("twotower_errors_total")

    def __call__(self, api: str, code: str) -> None:
        self.counter.inc(1, {"api": api, "code": code})


class MigrationCounter:
    """Counts streams HandleClient moved to another pair (its on_migrate hook)."""

    def __init__(self, model: str) -> None:
        self.counter, self.tags = make("twotower_migrations_total"), {"model": model}

    def __call__(self) -> None:
        self.counter.inc(1, self.tags)


def count_errors() -> None:
    """Register an ErrorCounter in this process, once. (A function of this module, so that a deployment
    class pickled by value reaches the real hook list, not a pickled copy of it.)"""
    from twotower.cluster.ingress import errors

    if not any(isinstance(h, ErrorCounter) for h in errors.ERROR_HOOKS):
        errors.ERROR_HOOKS.append(ErrorCounter())


class PrefixCacheMetrics:
    """The context tower's prefix-cache counters (engine CacheStats, cumulative) as Ray metrics: counters
    advance by what changed since the last update."""

    FIELDS = {"queries": "twotower_prefix_cache_queries_total", "hit_tokens": "twotower_prefix_cache_hit_tokens_total",
              "prefill_tokens": "twotower_prefix_cache_prefill_tokens_total",
              "evictions": "twotower_prefix_cache_evictions_total"}  # fmt: skip

    def __init__(self, tags: dict) -> None:
        self.tags = tags
        self.counters = {f: make(n) for f, n in self.FIELDS.items()}
        self.used, self.budget = make("twotower_prefix_cache_bytes_used"), make("twotower_prefix_cache_budget_bytes")
        self.last: dict[str, int] = dict.fromkeys(self.FIELDS, 0)

    def update(self, stats) -> None:
        for f, counter in self.counters.items():
            now = getattr(stats, f)
            if now > self.last[f]:
                counter.inc(now - self.last[f], self.tags)
            self.last[f] = max(now, self.last[f])
        self.used.set(stats.bytes_used, self.tags)
        self.budget.set(stats.budget, self.tags)


class ServeMetrics:
    def __init__(self, model: str) -> None:
        self.tags = {"model": model}
        self.ttft = make("twotower_time_to_first_token_s")
        self.inter_block = make("twotower_inter_block_latency_s")
        self.latency = make("twotower_request_latency_s")
        self.tokens = make("twotower_generated_tokens_total")
        self.requests = make("twotower_requests_total")
        self.tpf = make("twotower_tokens_per_forward")
        self.tpf_den = make("twotower_tokens_per_denoiser_forward")
        self.tpf_ctx = make("twotower_tokens_per_context_forward")
        self.steps_per_block = make("twotower_denoise_steps_per_block")
        self.state_bytes = make("twotower_state_bytes_per_block")
        self.state_ms = make("twotower_state_transfer_ms")
        self.tokens_per_s = make("twotower_tokens_per_s")
        self.queue = make("twotower_queue_depth")
        self.active = make("twotower_active_requests")
        self.prefix_cache = PrefixCacheMetrics(self.tags)

    def on_step(self, stats) -> None:
        self.queue.set(stats.waiting, self.tags)
        self.active.set(stats.rows, self.tags)
        if stats.new_tokens:
            self.tokens.inc(stats.new_tokens, self.tags)
        if stats.seconds > 0:
            self.tokens_per_s.set(stats.new_tokens / stats.seconds, self.tags)
        elif stats.rows == 0:  # idle
            self.tokens_per_s.set(0.0, self.tags)

    def on_finish(self, req) -> None:
        reason = req.finish_reason.value if req.finish_reason else "unknown"
        self.requests.inc(1, {"model": self.tags["model"], "finish_reason": reason})
        u = req.usage
        if u.completion_tokens and (u.denoiser_forwards + u.context_forwards):
            self.tpf.observe(u.tokens_per_forward, self.tags)
        if u.completion_tokens and u.denoiser_forwards:
            self.tpf_den.observe(u.completion_tokens / u.denoiser_forwards, self.tags)
        if u.completion_tokens and u.context_forwards:
            self.tpf_ctx.observe(u.completion_tokens / u.context_forwards, self.tags)
        if req.params.mode == "diffusion":
            blocks = -(-u.completion_tokens // req.params.block_size)
        else:  # lossless: one verify forward per draft (the prefill is the first context forward)
            blocks = u.context_forwards - 1
        if req.params.mode in ("diffusion", "lossless") and blocks > 0 and u.denoiser_forwards:
            self.steps_per_block.observe(u.denoiser_forwards / blocks, self.tags)

    def on_transfers(self, transfers: list[tuple[int, float]]) -> None:
        for nbytes, seconds in transfers:
            self.state_bytes.observe(nbytes, self.tags)
            self.state_ms.observe(1000 * seconds, self.tags)
