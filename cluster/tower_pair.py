"""A tower pair: the context and denoiser actors of one serving replica, placed together.

Placement: one placement group with bundles [{CPU} (the replica), {GPU: 1} (context), {GPU: 1}
(denoiser)] and STRICT_PACK, so both towers land on one node next to their replica. Inside a Serve
replica deployed with these `placement_group_bundles`, the replica's own group is reused; otherwise the
pair creates (and later removes) its own. On CPU the GPU bundles become small CPU bundles.

The two actors join one collective group (`nccl` between GPUs, `torch_gloo` on CPU) over which the
state deltas travel (Ray Direct Transport).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import ray
from ray.util.placement_group import get_current_placement_group, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from .tower_workers import ContextTowerWorker, DenoiserTowerWorker

TRANSPORTS = {"nccl": "nccl", "gloo": "torch_gloo"}  # tensor_transport -> collective backend


@dataclass
class PairConfig:
    model: str  # checkpoint directory visible to the workers
    use_gpus: bool = False  # one GPU per tower
    transport: str = "auto"  # nccl | gloo | auto (nccl with GPUs, else gloo)
    dtype: str | None = None
    kv_capacity: int = 256
    worker_threads: int | None = 1  # torch threads per CPU worker
    worker_cpus: float = 0.0  # CPU resource each tower actor reserves (0 keeps tiny machines schedulable)
    replica_cpus: float = 1.0  # CPU of bundle 0, the serving replica's own
    placement_strategy: str = "STRICT_PACK"
    ready_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if self.transport == "auto":
            self.transport = "nccl" if self.use_gpus else "gloo"
        if self.transport not in TRANSPORTS:
            raise ValueError(f"PairConfig.transport: must be nccl, gloo or auto (got {self.transport!r})")
        if self.transport == "nccl" and not self.use_gpus:
            raise ValueError("PairConfig.transport: nccl needs use_gpus=True")
        if self.placement_strategy not in ("STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"):
            raise ValueError(f"PairConfig.placement_strategy: unknown strategy {self.placement_strategy!r}")

    def bundles(self) -> list[dict[str, float]]:
        tower = {"GPU": 1.0} if self.use_gpus else {"CPU": max(self.worker_cpus, 0.01)}
        return [{"CPU": self.replica_cpus}, dict(tower), dict(tower)]


class TowerPairError(RuntimeError):
    """A tower actor died or failed: every request on the pair fails with this."""


class TowerPair:
    def __init__(self, cfg: PairConfig) -> None:
        self.cfg = cfg
        self.name = f"pair-{uuid.uuid4().hex[:8]}"
        pg = get_current_placement_group()
        self._own_pg = pg is None
        self.pg = placement_group(cfg.bundles(), strategy=cfg.placement_strategy) if pg is None else pg
        ray.get(self.pg.ready(), timeout=cfg.ready_timeout_s)
        device = "auto" if cfg.use_gpus else "cpu"
        num_gpus = 1 if cfg.use_gpus else 0
        actor_cls = {c: ray.remote(enable_tensor_transport=True)(c) for c in (ContextTowerWorker, DenoiserTowerWorker)}

        def place(i: int) -> dict:
            return {"num_gpus": num_gpus, "num_cpus": 0 if cfg.use_gpus else cfg.worker_cpus,
                    "scheduling_strategy": PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
                    "max_restarts": 0}  # fmt: skip

        self.context = (
            actor_cls[ContextTowerWorker]
            .options(**place(1))
            .remote(cfg.model, device, cfg.dtype, cfg.kv_capacity, cfg.worker_threads)
        )
        self.denoiser = actor_cls[DenoiserTowerWorker].options(**place(2)).remote(
            cfg.model, device, cfg.dtype, cfg.worker_threads)  # fmt: skip
        self.info = ray.get([self.context.ping.remote(), self.denoiser.ping.remote()], timeout=cfg.ready_timeout_s)
        from ray.experimental.collective import create_collective_group

        self.group = create_collective_group(
            [self.context, self.denoiser], backend=TRANSPORTS[cfg.transport], name=self.name
        )
        self.alive = True

    @property
    def tensor_transport(self) -> str:
        return self.cfg.transport

    def check_health(self, timeout_s: float = 10.0) -> None:
        """Raise TowerPairError unless both actors answer."""
        if not self.alive:
            raise TowerPairError(f"{self.name}: tower pair is down")
        try:
            ray.get([self.context.ping.remote(), self.denoiser.ping.remote()], timeout=timeout_s)
        except Exception as e:
            self.alive = False
            raise TowerPairError(f"{self.name}: tower actor unhealthy: {type(e).__name__}: {e}") from e

    def shutdown(self) -> None:
        self.alive = False
        from ray.experimental.collective import destroy_collective_group

        try:
            destroy_collective_group(self.name)
        except Exception:  # the group may already be gone with a dead actor
            pass
        for a in (self.context, self.denoiser):
            try:
                ray.kill(a)
            except Exception:
                pass
        if self._own_pg:
            remove_placement_group(self.pg)
