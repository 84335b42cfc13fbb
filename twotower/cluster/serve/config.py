"""Serving configuration: one validated dataclass tree, read from YAML/JSON or the CLI. The Helm chart's
values mirror it field for field (serveConfigV2 is generated from them).

    model            where the checkpoint is (a directory every node can read)
    engine           EngineConfig (batch limits, context length, ...)
    pair             tower placement: GPUs, transport, dtype (actors.config.PairConfig)
    autoscaling      Serve autoscaling of tower pairs (one replica = one pair)
    ports            HTTP (OpenAI-compatible) and gRPC
    defaults         default SamplingParams for requests that leave a field out
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twotower.cluster.actors.config import PairConfig
from twotower.cluster.engine.config import EngineConfig
from twotower.cluster.engine.params import ModelLimits, SamplingParams


@dataclass
class AutoscalingSettings:
    min_replicas: int = 1
    # None: as many pairs as the cluster's CPUs and GPUs hold, resolved when the app is deployed
    # (ServeConfig.fit_to); Kubernetes sets a number, as its node pool grows on demand
    max_replicas: int | None = None
    initial_replicas: int | None = None
    target_ongoing_requests: float = 8.0  # running + queued requests per pair before Serve adds one
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    look_back_period_s: float = 30.0

    def validate(self) -> None:
        if self.min_replicas < 0:
            raise ValueError(f"autoscaling.min_replicas: must be >= 0 (got {self.min_replicas})")
        if self.max_replicas is not None and self.max_replicas < max(1, self.min_replicas):
            raise ValueError(f"autoscaling.max_replicas: must be >= max(1, min_replicas={self.min_replicas}) "
                             f"(got {self.max_replicas})")  # fmt: skip
        top = self.max_replicas if self.max_replicas is not None else float("inf")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= top:
            raise ValueError(f"autoscaling.initial_replicas: must lie in [min_replicas, max_replicas] "
                             f"(got {self.initial_replicas})")  # fmt: skip
        if self.target_ongoing_requests <= 0:
            raise ValueError(f"autoscaling.target_ongoing_requests: must be > 0 (got {self.target_ongoing_requests})")
        for name in ("upscale_delay_s", "downscale_delay_s", "look_back_period_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"autoscaling.{name}: must be >= 0 (got {getattr(self, name)})")

    def to_serve(self) -> dict[str, Any]:
        if self.max_replicas is None:
            raise ValueError("autoscaling.max_replicas: not resolved; ServeConfig.fit_to(the cluster's resources) "
                             "sets it")  # fmt: skip
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


REQUEST_ROUTERS = ("prefix_affinity", "power_of_two")


@dataclass
class ServeConfig:
    model: str | None = None  # checkpoint directory; None = the bundled model
    served_model_name: str = "twotower"
    app_name: str = "twotower"
    # the address the HTTP proxy binds: loopback unless a config says otherwise (the Helm chart binds
    # the pod network); the gRPC listener of the Ingress replica binds it too
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 9000
    # Prometheus metrics of each Ray node (Ray's metrics export port): `twotower serve` starts its local
    # Ray with it; on Kubernetes the chart's head.metricsPort / workers.metricsPort set it
    metrics_port: int = 8080
    request_timeout_s: float | None = None  # server-side cap on any request (deadlines may be shorter)
    max_ongoing_requests: int = 64  # per replica, before Serve queues at the router
    # requests each caller (the ingress) queues for the tower pairs beyond that; past it a request is
    # refused at once with RESOURCE_EXHAUSTED / 429 and Retry-After, never an unbounded wait. -1 = no bound
    max_queued_requests: int = 256
    # on scale-down and shutdown a tower pair stops taking requests and lets those in flight finish for up
    # to this long before it is stopped (Serve's graceful_shutdown_timeout_s)
    drain_timeout_s: float = 120.0
    # times one request may move to another tower pair when its pair dies mid-stream: it resumes there
    # after the tokens it already streamed (serve/handle_client.py). 0 = off: such a stream ends UNAVAILABLE
    migration_limit: int = 1
    # how the ingress picks a tower pair (serve/prefix_router.py): "prefix_affinity" sends a prompt to the
    # pair that last read its leading prefix-cache grid blocks unless that pair's queue is longer than the
    # shortest by more than affinity_imbalance requests; "power_of_two" is Serve's own load-only choice
    request_router: str = "prefix_affinity"
    affinity_imbalance: int = 4
    # a file of API keys, one per line (a mounted Secret on Kubernetes): when set, both APIs need
    # `Authorization: Bearer <key>` on everything but health checks (ingress/auth.py)
    api_keys_file: str | None = None
    # TLS for both APIs (Serve's HTTP proxy and the Ingress replica's gRPC server): certificate and key
    # files (PEM); with tls_ca_certs, clients must present a certificate that CA signed (mTLS)
    tls_certfile: str | None = None
    tls_keyfile: str | None = None
    tls_ca_certs: str | None = None
    replicas: int | None = None  # a fixed number of tower pairs (autoscaling off); None = autoscaling
    engine: EngineConfig = field(default_factory=EngineConfig)
    pair: PairConfig = field(default_factory=PairConfig)
    autoscaling: AutoscalingSettings = field(default_factory=AutoscalingSettings)
    defaults: dict[str, Any] = field(default_factory=dict)  # SamplingParams overrides

    def __post_init__(self) -> None:
        if isinstance(self.engine, dict):
            self.engine = EngineConfig(**self.engine)
        if isinstance(self.pair, dict):
            self.pair = PairConfig(**self.pair)
        if isinstance(self.autoscaling, dict):
            self.autoscaling = AutoscalingSettings(**self.autoscaling)
        self.validate()

    def validate(self) -> None:
        for name in ("http_port", "grpc_port", "metrics_port"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 0 < v < 65536:
                raise ValueError(f"{name}: must be a TCP port 1..65535 (got {v!r})")
        if self.http_port == self.grpc_port:
            raise ValueError("grpc_port: must differ from http_port")
        if self.metrics_port in (self.http_port, self.grpc_port):
            raise ValueError(f"metrics_port: must differ from http_port and grpc_port (got {self.metrics_port})")
        if self.max_ongoing_requests < 1:
            raise ValueError(f"max_ongoing_requests: must be >= 1 (got {self.max_ongoing_requests})")
        if not isinstance(self.drain_timeout_s, (int, float)) or not 0 <= self.drain_timeout_s <= 3600:
            raise ValueError(f"drain_timeout_s: must be in [0, 3600] seconds (got {self.drain_timeout_s!r})")
        m = self.migration_limit
        if not isinstance(m, int) or isinstance(m, bool) or not 0 <= m <= 16:
            raise ValueError(f"migration_limit: must be an integer in [0, 16] (0 = off; got {m!r})")
        if self.request_router not in REQUEST_ROUTERS:
            raise ValueError(f"request_router: must be one of {', '.join(REQUEST_ROUTERS)} "
                             f"(got {self.request_router!r})")  # fmt: skip
        a = self.affinity_imbalance
        if not isinstance(a, int) or isinstance(a, bool) or a < 0:
            raise ValueError(f"affinity_imbalance: must be a non-negative integer (got {a!r})")
        q = self.max_queued_requests
        if not isinstance(q, int) or isinstance(q, bool) or (q < 1 and q != -1):
            raise ValueError(f"max_queued_requests: must be >= 1, or -1 for no bound (got {q!r})")
        if self.request_timeout_s is not None and self.request_timeout_s <= 0:
            raise ValueError(f"request_timeout_s: must be > 0 (got {self.request_timeout_s})")
        r = self.replicas
        if r is not None and (not isinstance(r, int) or isinstance(r, bool) or r < 1):
            raise ValueError(f"replicas: must be an integer >= 1, or null for autoscaling (got {r!r}); to let the "
                             f"pairs go to zero when idle, autoscale with autoscaling.min_replicas 0")  # fmt: skip
        for name in ("api_keys_file", "tls_certfile", "tls_keyfile", "tls_ca_certs"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                raise ValueError(f"{name}: must be a file path or null (got {v!r})")
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise ValueError("tls_keyfile: HTTPS needs both tls_certfile and tls_keyfile")
        if self.tls_ca_certs is not None and self.tls_certfile is None:
            raise ValueError("tls_ca_certs: client certificates need HTTPS (tls_certfile and tls_keyfile)")
        if not isinstance(self.host, str) or not self.host:
            raise ValueError(f"host: must be an address to bind, such as 127.0.0.1 or 0.0.0.0 (got {self.host!r})")
        if not self.served_model_name:
            raise ValueError("served_model_name: must not be empty")
        self.pair.validate()  # again: a caller may have changed a field since construction
        self.autoscaling.validate()
        self.default_params()  # unknown or invalid defaults fail here

    def default_params(self) -> SamplingParams:
        names = {f.name for f in dataclasses.fields(SamplingParams)}
        unknown = sorted(set(self.defaults) - names)
        if unknown:
            raise ValueError(f"defaults: unknown sampling field(s) {', '.join(unknown)}")
        params = SamplingParams(**self.defaults)
        # model-independent checks now; the model's own limits apply per request
        params.validate(
            ModelLimits(vocab_size=2**31 - 1, max_model_len=2**31 - 1, max_block_size=self.engine.max_block_size)
        )
        return params

    @staticmethod
    def from_dict(raw: dict[str, Any]) -> ServeConfig:
        names = {f.name for f in dataclasses.fields(ServeConfig)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise ValueError(f"config: unknown field(s) {', '.join(unknown)}")
        for section, cls in (("engine", EngineConfig), ("pair", PairConfig), ("autoscaling", AutoscalingSettings)):
            sub = raw.get(section)
            if isinstance(sub, dict):
                bad = sorted(set(sub) - {f.name for f in dataclasses.fields(cls)})
                if bad:
                    raise ValueError(f"{section}: unknown field(s) {', '.join(bad)}")
        return ServeConfig(**raw)

    @staticmethod
    def from_file(path: str | Path) -> ServeConfig:
        text = Path(path).read_text()
        if str(path).endswith((".yaml", ".yml")):
            import yaml

            raw = yaml.safe_load(text) or {}
        else:
            raw = json.loads(text)
        return ServeConfig.from_dict(raw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fit_to(self, resources: dict[str, float]) -> ServeConfig:
        """A copy whose open autoscaling bound (max_replicas None) is the number of tower pairs that the
        cluster's `resources` (ray.cluster_resources()) hold, at least min_replicas and 1."""
        if self.replicas is not None or self.autoscaling.max_replicas is not None:
            return self
        top = max(1, self.autoscaling.min_replicas, self.pair.pairs_fitting(resources))
        if self.autoscaling.initial_replicas is not None:
            top = max(top, self.autoscaling.initial_replicas)
        return dataclasses.replace(self, autoscaling=dataclasses.replace(self.autoscaling, max_replicas=top))
