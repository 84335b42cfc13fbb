"""One tower pair's placement and transport: one validated dataclass, the `pair:` section of ServeConfig
(and of the Helm values), and the one place the pair's placement bundles are built. No Ray here, so the
deploy config and the Helm tests read it without starting anything.

Bundles: [{CPU: replica_cpus} (the serving replica), tower, tower] with tower = {GPU: 1} with GPUs,
else a small CPU bundle; STRICT_PACK keeps the three on one node.
"""

from __future__ import annotations

from dataclasses import dataclass

from twotower.cluster.engine.config import DTYPES

TRANSPORTS = {"nccl": "nccl", "gloo": "torch_gloo"}  # tensor transport -> collective backend
PLACEMENT_STRATEGY = "STRICT_PACK"


@dataclass
class PairConfig:
    enabled: bool = True  # False: both towers in the replica process (one device, no Ray actors)
    use_gpus: bool = False  # one GPU per tower
    transport: str = "auto"  # nccl | gloo | auto (nccl with GPUs, else gloo)
    dtype: str | None = None  # None: see engine.loading.resolve_dtype
    worker_threads: int | None = 1  # torch threads per tower actor on CPU
    replica_cpus: float = 0.5  # CPU of the replica itself (bundle 0); it mostly waits on the towers
    worker_cpus: float = 0.0  # CPU reserved by each tower actor (0 keeps tiny machines schedulable)
    micro_batches: int = 2  # lanes per mode group, so that the two towers pipeline

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.transport not in ("auto", *TRANSPORTS):
            raise ValueError(f"pair.transport: must be auto, nccl or gloo (got {self.transport!r})")
        if self.transport == "nccl" and not self.use_gpus:
            raise ValueError("pair.transport: nccl needs pair.use_gpus: true")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"pair.dtype: must be float32, bfloat16 or float16 (got {self.dtype!r})")
        if not isinstance(self.micro_batches, int) or self.micro_batches < 1:
            raise ValueError(f"pair.micro_batches: must be >= 1 (got {self.micro_batches!r})")
        if self.replica_cpus <= 0:
            raise ValueError(f"pair.replica_cpus: must be > 0 (got {self.replica_cpus})")
        if self.worker_cpus < 0:
            raise ValueError(f"pair.worker_cpus: must be >= 0 (got {self.worker_cpus})")

    @property
    def tensor_transport(self) -> str:
        """nccl or gloo, with auto resolved."""
        if self.transport == "auto":
            return "nccl" if self.use_gpus else "gloo"
        return self.transport

    def bundles(self) -> list[dict[str, float]]:
        """The placement group bundles of one pair: [replica, context tower, denoiser tower]."""
        tower = {"GPU": 1.0} if self.use_gpus else {"CPU": max(self.worker_cpus, 0.01)}
        return [{"CPU": self.replica_cpus}, dict(tower), dict(tower)]

    def pairs_fitting(self, resources: dict[str, float]) -> int:
        """How many pairs `resources` (a cluster's totals, as ray.cluster_resources() gives them) hold,
        counting every resource the bundles ask for."""
        need: dict[str, float] = {}
        for bundle in self.bundles():
            for k, v in bundle.items():
                need[k] = need.get(k, 0.0) + v
        return min(int(resources.get(k, 0.0) // v) for k, v in need.items() if v > 0)
