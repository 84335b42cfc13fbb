"""twotower.kernels must import and run its references where triton is not installed: the Triton kernel
modules are imported lazily, only for CUDA tensors. Checked in a fresh interpreter where `import triton`
fails (sys.modules["triton"] = None), so the state of this test process does not matter."""

from __future__ import annotations

import os
import subprocess
import sys

SCRIPT = r"""
import sys, types
sys.modules["triton"] = None  # any `import triton` now raises ImportError
import torch
torch.set_num_threads(1)
from twotower import kernels
assert "twotower.kernels.triton_ssd" not in sys.modules
assert kernels._optional("triton") is None
fake_cuda = types.SimpleNamespace(is_cuda=True)
assert kernels._triton_kernels(fake_cuda, "triton_ssd") is None  # would fall back even on CUDA
try:
    import twotower.kernels.triton_mamba_step  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("triton_mamba_step imported without triton")
g = torch.Generator().manual_seed(0)
b, l, h, gr, p, n = 2, 3, 4, 2, 4, 8
x, dt = torch.randn(b, l, h, p, generator=g), torch.rand(b, l, h, generator=g) * 0.1
A = -torch.rand(h, generator=g) - 1
Bm, Cm = torch.randn(b, l, gr, n, generator=g), torch.randn(b, l, gr, n, generator=g)
pool = torch.randn(5, h, p, n, generator=g)
slots = torch.tensor([3, 1])
y, ret = kernels.ssd_block_scan(x, dt, A, Bm, Cm, None, pool, state_slots=slots, out_state=pool)
assert ret is pool and y.shape == (b, l, h, p)
y2, _ = kernels.ssd_scan(x, dt, A, Bm, Cm, None, initial_state=torch.randn(b, h, p, n), chunk_size=16)
conv_dim = h * p + 2 * gr * n
conv, ssm = torch.randn(b, conv_dim, 4, generator=g), torch.randn(b, h, p, n, generator=g)
y3 = kernels.mamba_decode_step(torch.randn(b, conv_dim, generator=g), conv, torch.randn(conv_dim, 4, generator=g),
                               None, torch.rand(b, h, generator=g) * 0.1, A, None, ssm)
assert y3.shape == (b, h, p)
print("ok")
"""


def test_kernels_import_and_refs_run_without_triton():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout + done.stderr
