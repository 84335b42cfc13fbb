"""A tower pair: the context and denoiser actors of one serving replica, placed together.

Placement: one placement group with the bundles of `PairConfig.bundles` ([replica, context tower,
denoiser tower]) and STRICT_PACK, so both towers land on one node next to their replica. Inside a Serve
replica deployed with these `placement_group_bundles`, the replica's own group is reused; otherwise the
pair creates (and later removes) its own. On CPU the GPU bundles become small CPU bundles.

The two actors join one collective group (`nccl` between GPUs, `torch_gloo` on CPU) over which the
state deltas travel (Ray Direct Transport).
"""

from __future__ import annotations

import uuid

import ray
from ray.util.placement_group import get_current_placement_group, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from twotower.cluster.engine.config import EngineConfig
from twotower.cluster.engine.errors import TowersUnavailable

from .config import PLACEMENT_STRATEGY, TRANSPORTS, PairConfig
from .workers import ContextTowerWorker, DenoiserTowerWorker


class TowerPairError(TowersUnavailable):
    """A tower actor died: every request on the pair fails with this, and may be retried elsewhere."""


class TowerPair:
    def __init__(self, model: str, cfg: PairConfig, engine: EngineConfig | None = None,
                 ready_timeout_s: float = 300.0) -> None:  # fmt: skip
        """model: a checkpoint directory every node of the pair can read; engine: sizes both towers'
        state pools (max_num_seqs, max_model_len, max_block_size) and says whether steps compile."""
        engine = engine or EngineConfig()
        limits = engine.pool_limits()
        self.cfg = cfg
        self.name = f"pair-{uuid.uuid4().hex[:8]}"
        pg = get_current_placement_group()
        self._own_pg = pg is None
        self.pg = placement_group(cfg.bundles(), strategy=PLACEMENT_STRATEGY) if pg is None else pg
        ray.get(self.pg.ready(), timeout=ready_timeout_s)
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
            .remote(model, device, cfg.dtype, limits, not engine.eager, cfg.worker_threads)
        )
        self.denoiser = actor_cls[DenoiserTowerWorker].options(**place(2)).remote(
            model, device, cfg.dtype, limits, not engine.eager, cfg.worker_threads)  # fmt: skip
        ray.get([self.context.ping.remote(), self.denoiser.ping.remote()], timeout=ready_timeout_s)  # both loaded
        from ray.experimental.collective import create_collective_group

        self.group = create_collective_group(
            [self.context, self.denoiser], backend=TRANSPORTS[cfg.tensor_transport], name=self.name
        )
        self.alive = True

    @property
    def tensor_transport(self) -> str:
        return self.cfg.tensor_transport

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
