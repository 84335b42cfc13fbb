"""What the tests that deploy the Serve app on local Ray share: free ports, and the tiny random-weight
TwoTower they serve (vocab 260 = ByteTokenizer; the denoiser's head sharpened so that gamma commits)."""

from __future__ import annotations

import socket
from pathlib import Path

import torch

from twotower.towers.checkpoint import save_twotower
from twotower.towers.config import preset
from twotower.towers.context import ContextTower
from twotower.towers.denoiser import DenoiserTower
from twotower.towers.init import init_random_


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_tiny_model(path: Path) -> Path:
    cfg = preset("tiny").replace(vocab_size=260)
    ctx, den = init_random_(ContextTower(cfg), 0), init_random_(DenoiserTower(cfg), 1)
    with torch.no_grad():
        den.lm_head.weight.mul_(30)
    save_twotower(path, ctx, den)
    return path


def start_local_ray(num_cpus: int = 4) -> tuple[str, int]:
    """A local Ray with its dashboard (the REST API deploys through it) on 127.0.0.1; returns the dashboard
    URL and the node's metrics export port."""
    import os

    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    dash, metrics_port = free_port(), free_port()
    ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=dash,
             _metrics_export_port=metrics_port, log_to_driver=False)  # fmt: skip
    return f"http://127.0.0.1:{dash}", metrics_port
