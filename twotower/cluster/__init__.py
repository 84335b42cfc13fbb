"""twotower.cluster: the serving system, one sub-package per layer, in the order of the request path's
hops from the bottom up (each may import only those before it):

    engine/   requests, scheduler, lanes, the step loop, the executor seam, tower runners (no Ray)
    actors/   each tower in its own Ray actor; a tower pair; the Ray executor
    ingress/  the gRPC and OpenAI HTTP APIs: conversion, transport, one error classifier
    serve/    the Ray Serve application: config, deploy config, tower-pair server, metrics
    cli/      the `twotower` command

The public API, for running the engine in-process:

    from twotower.cluster import Engine, AsyncEngine, SamplingParams, EngineConfig, load_model, build_engine
    engine = build_engine(load_model(None), EngineConfig(eager=True))   # None: the bundled model; eager steps

Resolved lazily, so that importing a sub-package (say serve.deploy, which only edits a dict) does not
load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_PUBLIC = {
    "Engine": "twotower.cluster.engine.engine",
    "AsyncEngine": "twotower.cluster.engine.async_engine",
    "SamplingParams": "twotower.cluster.engine.params",
    "EngineConfig": "twotower.cluster.engine.config",
    "load_model": "twotower.cluster.engine.loading",
    "build_engine": "twotower.cluster.engine.loading",
    "version": "twotower.cluster.engine.version",
}
__all__ = ["AsyncEngine", "Engine", "EngineConfig", "SamplingParams", "build_engine", "load_model", "version"]

if TYPE_CHECKING:  # pragma: no cover
    from .engine.async_engine import AsyncEngine
    from .engine.config import EngineConfig
    from .engine.engine import Engine
    from .engine.loading import build_engine, load_model
    from .engine.params import SamplingParams
    from .engine.version import version


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
