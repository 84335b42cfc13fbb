"""`/metrics` on the HTTP port: the twotower and Serve families of every Ray node's Prometheus endpoint,
merged into one exposition.

Each Ray node exports the metrics of the processes on it (tower-pair replicas, ingresses, Serve's
controller) on its metrics export port; `ray.nodes()` says where. Prometheus can scrape those ports
directly (the Helm chart's ServiceMonitor does); this route is for everyone else, as vLLM serves
`/metrics` on its API port. Families are merged so each `# HELP` / `# TYPE` appears once, whichever
nodes report it (their samples differ in Ray's node labels).
"""

from __future__ import annotations

import asyncio
import logging
import urllib.request

from .metrics import SCRAPED_PREFIX

log = logging.getLogger(__name__)
FAMILIES = (SCRAPED_PREFIX + "twotower_", SCRAPED_PREFIX + "serve_")


def node_endpoints() -> list[str]:
    """The metrics URL of every alive Ray node."""
    import ray

    return [f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics" for n in ray.nodes()
            if n.get("Alive") and n.get("MetricsExportPort")]  # fmt: skip


def _family(line: str) -> str | None:
    """The metric family a line belongs to (histogram suffixes folded), or None for other comments."""
    if line.startswith("# HELP ") or line.startswith("# TYPE "):
        return line.split(" ", 3)[2]
    if line.startswith("#") or not line.strip():
        return None
    name = line.split("{", 1)[0].split(" ", 1)[0]
    for suffix in ("_bucket", "_sum", "_count", "_created"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def merge(texts: list[str], families: tuple[str, ...] = FAMILIES) -> str:
    """One exposition of the families starting with `families` across `texts`."""
    headers: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = {}
    for text in texts:
        for line in text.splitlines():
            fam = _family(line)
            if fam is None or not fam.startswith(families):
                continue
            if line.startswith("#"):
                hs = headers.setdefault(fam, [])
                if line not in hs:
                    hs.append(line)
            else:
                samples.setdefault(fam, []).append(line)
    out: list[str] = []
    for fam in sorted(set(headers) | set(samples)):
        out += headers.get(fam, []) + samples.get(fam, [])
    return "\n".join(out) + "\n"


def _fetch(url: str, timeout_s: float) -> str:
    with urllib.request.urlopen(url, timeout=timeout_s) as r:  # noqa: S310 (the node's own metrics port)
        return r.read().decode("utf-8", "replace")


async def scrape(timeout_s: float = 3.0) -> str:
    """The merged exposition; a node that does not answer in time is left out (and logged)."""
    urls = await asyncio.to_thread(node_endpoints)
    results = await asyncio.gather(*(asyncio.to_thread(_fetch, u, timeout_s) for u in urls), return_exceptions=True)
    texts = []
    for url, r in zip(urls, results, strict=True):
        if isinstance(r, BaseException):
            log.warning("metrics of %s: %s: %s", url, type(r).__name__, r)
        else:
            texts.append(r)
    return merge(texts)


def totals(text: str) -> dict[str, float]:
    """Series name (labels dropped) -> the sum of its samples over every label set and node: what a
    one-line summary (the CLI's throughput log) reads from an exposition."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        if "{" in line:  # name{labels} value [timestamp]; label values may hold spaces
            name, rest = line[: line.index("{")], line[line.rindex("}") + 1 :]
        else:
            name, _, rest = line.partition(" ")
        value = rest.split()[0] if rest.split() else ""
        try:
            out[name] = out.get(name, 0.0) + float(value)
        except ValueError:
            continue
    return out
