"""The Ray layer: each tower in its own actor on its own device, the pair of them as one serving
replica's placement group, and the TowerExecutor over them.

    config        PairConfig and the placement bundles (plain data: importing it starts no Ray)
    workers       ContextTowerWorker, DenoiserTowerWorker (one runner each)
    pair          TowerPair: placement, actors, the collective group for state deltas
    ray_executor  RayExecutor: engine operations as actor calls, deltas actor to actor

Only `pair` and `ray_executor` import Ray; this package's __init__ imports nothing.
"""
