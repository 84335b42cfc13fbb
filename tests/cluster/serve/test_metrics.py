"""The metrics contract: the Grafana dashboard queries only metrics that exist, covers what operators
watch, the docs list exactly the scraped names, and /metrics merges node expositions correctly."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from twotower.cluster.serve.metrics import METRICS, SCRAPED_PREFIX
from twotower.cluster.serve.metrics_scrape import merge

ROOT = Path(__file__).resolve().parents[3]
DASHBOARD = ROOT / "helm" / "twotower" / "dashboards" / "twotower.json"
DOCS = ROOT / "docs" / "metrics.md"
SUFFIXES = {"_bucket": "histogram", "_sum": "histogram", "_count": "histogram"}


def _exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p["targets"]]


def _ray_serve_metric_names() -> set[str]:
    """Metric names Ray Serve defines: string literals `serve_...` in its installed source."""
    ray = pytest.importorskip("ray")
    src = Path(ray.__file__).parent / "serve" / "_private"
    names = set()
    for f in src.glob("*.py"):
        names |= set(re.findall(r'"(serve_[a-z0-9_]+)"', f.read_text()))
    return names


def test_every_dashboard_query_names_a_metric_that_exists():
    ours = {SCRAPED_PREFIX + n: kind for n, (kind, _, _) in METRICS.items()}
    serve = {SCRAPED_PREFIX + n for n in _ray_serve_metric_names()}
    seen = set()
    for expr in _exprs():
        for name in re.findall(r"\b(ray_[a-z0-9_]+)", expr):
            base, kind = name, None
            for suffix, k in SUFFIXES.items():
                if name.endswith(suffix) and name[: -len(suffix)] in ours:
                    base, kind = name[: -len(suffix)], k
            assert base in ours or base in serve, f"{name} in {expr!r} is not a metric anyone exports"
            if base in ours:
                assert kind is None or ours[base] == kind, f"{name}: {base} is a {ours[base]}, not a {kind}"
                assert kind is not None or ours[base] != "histogram", f"{name}: a histogram needs _bucket/_sum/_count"
            seen.add(base)
    # what operators watch (issue list): latency, throughput, efficiency, load, state traffic, errors, replicas
    must = ["time_to_first_token_s", "inter_block_latency_s", "generated_tokens_total", "tokens_per_denoiser_forward",
            "tokens_per_context_forward", "denoise_steps_per_block", "queue_depth", "active_requests",
            "state_bytes_per_block", "state_transfer_ms", "errors_total", "prefix_cache_hit_tokens_total",
            "prefix_cache_prefill_tokens_total", "prefix_cache_bytes_used"]  # fmt: skip
    missing = [m for m in must if SCRAPED_PREFIX + "twotower_" + m not in seen]
    assert not missing and "ray_serve_deployment_replica_healthy" in seen, missing


def test_docs_list_exactly_the_scraped_names():
    documented = set(re.findall(r"`(ray_twotower_[a-z0-9_]+)`", DOCS.read_text()))
    assert documented == {SCRAPED_PREFIX + n for n in METRICS}


def test_merge_keeps_one_header_per_family_and_only_ours():
    node_a = ("# HELP ray_twotower_queue_depth waiting\n# TYPE ray_twotower_queue_depth gauge\n"
              'ray_twotower_queue_depth{NodeAddress="a"} 1.0\n# TYPE ray_other gauge\nray_other 3\n'
              "# TYPE ray_twotower_request_latency_s histogram\n"
              'ray_twotower_request_latency_s_bucket{le="1.0"} 2\n'
              "ray_twotower_request_latency_s_count 2\n")  # fmt: skip
    node_b = ("# HELP ray_twotower_queue_depth waiting\n# TYPE ray_twotower_queue_depth gauge\n"
              'ray_twotower_queue_depth{NodeAddress="b"} 4.0\n'
              "# TYPE ray_serve_x counter\nray_serve_x_total 1\n")  # fmt: skip
    out = merge([node_a, node_b]).splitlines()
    assert out.count("# TYPE ray_twotower_queue_depth gauge") == 1 and not any("ray_other" in line for line in out)
    i = out.index("# TYPE ray_twotower_queue_depth gauge")
    assert out[i + 1 : i + 3] == ['ray_twotower_queue_depth{NodeAddress="a"} 1.0',
                                  'ray_twotower_queue_depth{NodeAddress="b"} 4.0']  # fmt: skip
    assert "ray_twotower_request_latency_s_count 2" in out and "ray_serve_x_total 1" in out


def test_prefix_cache_metrics_advance_counters_by_what_changed(monkeypatch):
    """The engine's cache counters are cumulative; Ray counters take increments (and no zero ones)."""
    from twotower.cluster.engine.prefix_cache import CacheStats
    from twotower.cluster.serve import metrics

    class Recorder:
        def __init__(self) -> None:
            self.calls: list = []

        def inc(self, value, tags) -> None:
            self.calls.append(value)

        set = inc

    monkeypatch.setattr(metrics, "make", lambda name: Recorder())
    pm = metrics.PrefixCacheMetrics({"model": "m"})
    pm.update(CacheStats(queries=3, hit_tokens=512, prefill_tokens=40, bytes_used=100, budget=1000))
    pm.update(CacheStats(queries=5, hit_tokens=512, prefill_tokens=72, evictions=1, bytes_used=90, budget=1000))
    got = {f: c.calls for f, c in pm.counters.items()}
    assert got == {"queries": [3, 2], "hit_tokens": [512], "prefill_tokens": [40, 32], "evictions": [1]}
    assert pm.used.calls == [100, 90] and pm.budget.calls == [1000, 1000]
