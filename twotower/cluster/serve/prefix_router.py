"""Prefix-affinity routing across tower pairs: a Ray Serve RequestRouter (ServeConfig.request_router
"prefix_affinity"), set on the TowerPair deployment (deploy.py) and run by every handle to it (the
Ingress replica's).

Each pair's context tower keeps a prefix cache on a grid of G tokens (engine/prefix_cache.py), so a
prompt is cheapest on the pair that last read its leading grid blocks. The router keys each generate
request by engine.prefix_cache.grid_prefix_keys of its prompt (token ids as given, or text through the
model's tokenizer, the engine's own) and remembers which replica each key last went to. A request goes
to the replica holding its longest known prefix, unless that replica's queue is longer than the
shortest one's by more than `imbalance` requests: then, and for prompts no replica holds, load decides
as in Serve's default router (the shorter queue of two random replicas; a fixed order would send every
tie, such as a burst of short prompts, to the same replica). If the preferred replica refuses (its
queue is full), the others are the second rank.

The table is a guess about each replica's cache, not a copy of it: a replica may have evicted an
entry; it then reads the prompt again and caches it anew. The table is bounded (LRU) and forgets a
replica that died.
"""

from __future__ import annotations

import logging
import random
from collections import OrderedDict

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from twotower.cluster.engine.prefix_cache import grid_prefix_keys

log = logging.getLogger("twotower.router")


class AffinityTable:
    """Prefix key -> the replica it last went to (least recently used first, at most `capacity`)."""

    def __init__(self, capacity: int = 65536) -> None:
        self.capacity = capacity
        self.owners: OrderedDict[int, ReplicaID] = OrderedDict()

    def owner(self, keys: list[int], alive) -> ReplicaID | None:
        """The replica (among `alive`) of the longest key it holds."""
        for key in reversed(keys):
            rid = self.owners.get(key)
            if rid is not None and rid in alive:
                return rid
        return None

    def record(self, keys: list[int], rid: ReplicaID) -> None:
        for key in keys:
            self.owners[key] = rid
            self.owners.move_to_end(key)
        while len(self.owners) > self.capacity:
            self.owners.popitem(last=False)

    def forget(self, rid: ReplicaID) -> None:
        for key in [k for k, r in self.owners.items() if r == rid]:
            del self.owners[key]


def prefer(owner: ReplicaID | None, loads: dict[ReplicaID, int], imbalance: int) -> list[list[ReplicaID]]:
    """Ranks of replica ids: [owner] then the rest, when the owner is within `imbalance` of the least
    loaded; otherwise (or with no owner) one rank of all."""
    if owner is None or owner not in loads or loads[owner] > min(loads.values()) + imbalance:
        return [list(loads)]
    return [[owner], [r for r in loads if r != owner]]


class PrefixAffinityRouter(RequestRouter):
    """No FIFOMixin: with it Serve may hand the replica chosen for one request to an older one, which
    would undo the affinity; the base class fulfils exactly the request it chose for."""

    def initialize_state(self, model: str | None = None, grid: int = 256, imbalance: int = 4,
                         capacity: int = 65536) -> None:  # fmt: skip
        self.grid, self.imbalance, self.model = grid, imbalance, model
        self.table = AffinityTable(capacity)
        self._tokenizer = None
        self._keys: OrderedDict[str, list[int]] = OrderedDict()  # internal request id -> its keys

    def _encode(self, text: str) -> list[int] | None:
        try:
            if self._tokenizer is None:
                from twotower.cluster.engine.loading import ModelFiles, resolve_model

                self._tokenizer = ModelFiles.inspect(resolve_model(self.model)).tokenizer
            return self._tokenizer.encode(text)
        except Exception as e:  # routing falls back to load; the engine answers bad input itself
            log.debug("prefix routing: cannot tokenize (%s)", e)
            return None

    def prompt_keys(self, pending: PendingRequest | None) -> list[int]:
        if pending is None:
            return []
        rid = pending.metadata.internal_request_id
        if rid in self._keys:
            return self._keys[rid]
        req = next((a for a in pending.args if hasattr(a, "prompt_token_ids") and hasattr(a, "prompt")), None)
        ids = None
        if req is not None:
            ids = list(req.prompt_token_ids) if req.prompt_token_ids is not None else None
            if ids is None and isinstance(req.prompt, str):
                ids = self._encode(req.prompt)
        keys = grid_prefix_keys(ids, self.grid) if ids else []
        self._keys[rid] = keys
        while len(self._keys) > 4096:  # requests that were cancelled before they were routed
            self._keys.popitem(last=False)
        return keys

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:  # fmt: skip
        if not candidate_replicas:
            return []
        by_id = {r.replica_id: r for r in candidate_replicas}
        owner = self.table.owner(self.prompt_keys(pending_request), by_id)
        loads = {rid: self.replica_queue_len_cache.get(rid) or 0 for rid in by_id}
        ranks = prefer(owner, loads, self.imbalance)
        if len(ranks) == 1:  # load decides: two random replicas, the shorter queue wins (Serve's power of two)
            ranks = [random.sample(ranks[0], min(2, len(ranks[0])))]
        return [[by_id[rid] for rid in rank] for rank in ranks]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        keys = self._keys.pop(pending_request.metadata.internal_request_id, None)
        if keys:
            self.table.record(keys, replica_id)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.table.forget(replica_id)
