"""The dependency direction: the engine core imports without Ray, Serve, gRPC or protobuf; towers never
import cluster; kernels import neither."""

from __future__ import annotations

import subprocess
import sys

CORE = ["api_types", "config", "engine", "evaluation", "executor", "lanes", "loading", "request", "runners",
        "sampler", "sampling", "scheduler", "serve_config", "tokenizer", "unmask", "cli"]  # fmt: skip


def _loaded_after(imports: list[str]) -> set[str]:
    code = "import sys\n" + "".join(f"import {m}\n" for m in imports) + "print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_engine_core_imports_without_ray_or_grpc():
    mods = _loaded_after([f"twotower.cluster.{m}" for m in CORE])
    bad = sorted(m for m in mods if m.split(".")[0] in ("ray", "grpc", "google", "fastapi"))
    assert not bad, f"core modules pulled in {bad[:10]}"


def test_towers_and_kernels_do_not_import_upwards():
    mods = _loaded_after(["twotower.towers.context", "twotower.towers.denoiser", "twotower.towers.checkpoint",
                          "twotower.towers.train.run", "twotower.kernels"])  # fmt: skip
    assert not [m for m in mods if m.startswith("twotower.cluster")]
    mods = _loaded_after(["twotower.kernels"])
    assert not [m for m in mods if m.startswith(("twotower.towers", "twotower.cluster"))]
