"""Serving metrics through Ray's metrics API (exported by Ray in Prometheus format).

Names are prefixed `twotower_`. Latencies are histograms in seconds; everything else gauges/counters:
    time_to_first_token_s, inter_block_latency_s (time between streamed deltas), request_latency_s
    generated_tokens_total, requests_total{finish_reason}
    tokens_per_forward, denoise_steps_per_block (per finished request, as histograms)
    state_bytes_per_block, state_transfer_ms (per delta sent to the denoiser's mirror)
    queue_depth, active_requests
"""

from __future__ import annotations

from ray.util import metrics as m

_LAT = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]


class ServeMetrics:
    def __init__(self, model: str) -> None:
        tags = ("model",)
        self.tags = {"model": model}
        self.ttft = m.Histogram("twotower_time_to_first_token_s", "time to first token", _LAT, tags)
        self.inter_block = m.Histogram("twotower_inter_block_latency_s", "time between streamed deltas", _LAT, tags)
        self.latency = m.Histogram("twotower_request_latency_s", "request latency", _LAT, tags)
        self.tokens = m.Counter("twotower_generated_tokens_total", "generated tokens", tags)
        self.requests = m.Counter("twotower_requests_total", "finished requests", ("model", "finish_reason"))
        self.tpf = m.Histogram("twotower_tokens_per_forward", "tokens per tower forward, per request",
                               [0.5, 1, 1.5, 2, 3, 4, 6, 8, 12, 16], tags)  # fmt: skip
        self.steps_per_block = m.Histogram("twotower_denoise_steps_per_block", "denoiser steps per block",
                                           [1, 2, 3, 4, 6, 8, 12, 16, 32], tags)  # fmt: skip
        self.state_bytes = m.Histogram("twotower_state_bytes_per_block", "state delta bytes sent to the denoiser",
                                       [1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9], tags)  # fmt: skip
        self.state_ms = m.Histogram("twotower_state_transfer_ms", "state delta transfer time",
                                    [0.1, 0.5, 1, 2, 5, 10, 25, 50, 100, 250], tags)  # fmt: skip
        self.tokens_per_s = m.Gauge("twotower_tokens_per_s", "generated tokens per second (last engine step)", tags)
        self.queue = m.Gauge("twotower_queue_depth", "requests waiting for a slot", tags)
        self.active = m.Gauge("twotower_active_requests", "requests being decoded", tags)

    def on_step(self, stats) -> None:
        self.queue.set(stats.waiting, self.tags)
        self.active.set(stats.rows, self.tags)
        if stats.new_tokens:
            self.tokens.inc(stats.new_tokens, self.tags)
        if stats.seconds > 0:
            self.tokens_per_s.set(stats.new_tokens / stats.seconds, self.tags)

    def on_finish(self, req) -> None:
        reason = req.finish_reason.value if req.finish_reason else "unknown"
        self.requests.inc(1, {"model": self.tags["model"], "finish_reason": reason})
        u = req.usage
        if u.completion_tokens and (u.denoiser_forwards + u.context_forwards):
            self.tpf.observe(u.tokens_per_forward, self.tags)
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
