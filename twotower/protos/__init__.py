"""Generated gRPC/protobuf modules of the twotower API, re-exported under stable names.

`twotower_v1.proto` is the source; `python -m twotower.protos.generate` regenerates
`twotower_v1_pb2.py`, `twotower_v1_pb2.pyi` and `twotower_v1_pb2_grpc.py` (docs/grpc.md).

    from twotower.protos import pb2, pb2_grpc, GenerateRequest, TwoTowerStub

The re-exports are resolved lazily so that `python -m twotower.protos.generate` works even when the
committed generated modules do not import (e.g. an older protobuf runtime than they were made for).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

SERVICE_NAME = "twotower.v1.TwoTower"  # full name of the service (reflection, health checks)
PB2 = "twotower.protos.twotower_v1_pb2"
PB2_GRPC = "twotower.protos.twotower_v1_pb2_grpc"
# Import path Serve's gRPCOptions.grpc_servicer_functions needs for our service.
ADD_SERVICER = f"{PB2_GRPC}.add_TwoTowerServicer_to_server"

_MESSAGES = ("Mode", "FinishReason", "TokenIds", "SamplingParams", "GenerateRequest", "GenerateChunk", "Usage",
             "ScoreRequest", "ScoreReply", "ModelInfoRequest", "ModelInfoReply")  # fmt: skip
_SERVICE = ("TwoTowerStub", "TwoTowerServicer", "add_TwoTowerServicer_to_server")

__all__ = ["SERVICE_NAME", "ADD_SERVICER", "pb2", "pb2_grpc", *_MESSAGES, *_SERVICE]

if TYPE_CHECKING:  # pragma: no cover
    from . import twotower_v1_pb2 as pb2
    from . import twotower_v1_pb2_grpc as pb2_grpc
    from .twotower_v1_pb2 import (  # noqa: F401  # noqa: F401
        FinishReason,
        GenerateChunk,
        GenerateRequest,
        Mode,
        ModelInfoReply,
        ModelInfoRequest,
        SamplingParams,
        ScoreReply,
        ScoreRequest,
        TokenIds,
        Usage,
    )
    from .twotower_v1_pb2_grpc import TwoTowerServicer, TwoTowerStub, add_TwoTowerServicer_to_server  # noqa: F401


def __getattr__(name: str) -> Any:
    if name == "pb2":
        return importlib.import_module(PB2)
    if name == "pb2_grpc":
        return importlib.import_module(PB2_GRPC)
    if name in _MESSAGES:
        return getattr(importlib.import_module(PB2), name)
    if name in _SERVICE:
        return getattr(importlib.import_module(PB2_GRPC), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
