"""The periodic throughput line `twotower serve` logs, as vLLM's engine does: generated tokens/s,
requests running and waiting, tokens per forward of each tower, tower pairs. Read from the metrics
every node exports (metrics_scrape.totals), so it says what Prometheus sees; rates are deltas of
counters between two scrapes."""

from __future__ import annotations

from twotower.cluster.serve.metrics import SCRAPED_PREFIX

P = SCRAPED_PREFIX + "twotower_"


class ThroughputLine:
    def __init__(self) -> None:
        self.last: tuple[float, dict[str, float]] | None = None
        self.was_idle = True

    def update(self, sums: dict[str, float], now: float, pairs: int) -> str | None:
        """The line for the interval since the last call; None before the first interval and while idle
        (one line marks the change to idle)."""
        last, self.last = self.last, (now, sums)
        if last is None:
            return None
        t0, before = last
        dt = max(now - t0, 1e-9)

        def delta(name: str) -> float:
            return max(sums.get(name, 0.0) - before.get(name, 0.0), 0.0)

        def mean(hist: str) -> str:  # mean per finished request over the interval
            n = delta(P + hist + "_count")
            return f"{delta(P + hist + '_sum') / n:.2f}" if n else "-"

        tokens = delta(P + "generated_tokens_total")
        running, waiting = sums.get(P + "active_requests", 0.0), sums.get(P + "queue_depth", 0.0)
        idle = tokens == 0 and running == 0 and waiting == 0
        if idle and self.was_idle:
            return None
        self.was_idle = idle
        return (f"throughput: {tokens / dt:.1f} tokens/s, running {running:.0f}, waiting {waiting:.0f}, "
                f"tokens/forward {mean('tokens_per_forward')} (denoiser {mean('tokens_per_denoiser_forward')}, "
                f"context {mean('tokens_per_context_forward')}), tower pairs {pairs}")  # fmt: skip
