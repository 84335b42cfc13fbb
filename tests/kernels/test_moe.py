"""Routed experts (twotower/kernels/moe.py) and the router (twotower/towers/moe.py TopkRouter) against explicit
per-token Python. Expert dims are multiples of 8 so torch's grouped_mm accepts them on CPU (16-byte strides)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.towers.reference import route
from twotower.kernels import moe_experts, moe_experts_ref
from twotower.kernels.moe import moe_experts_gathered, moe_experts_static
from twotower.towers.config import preset
from twotower.towers.moe import TopkRouter

HID, INTER, N_EXPERTS = 16, 24, 8


def weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    up = torch.randn(N_EXPERTS, INTER, HID, generator=g) / HID**0.5
    down = torch.randn(N_EXPERTS, HID, INTER, generator=g) / INTER**0.5
    return up, down


def routing(n, k, experts_used, seed=0):
    """Distinct experts per token drawn from `experts_used` only (the others receive no tokens)."""
    g = torch.Generator().manual_seed(seed)
    used = torch.tensor(experts_used)
    idx = torch.stack([used[torch.randperm(len(used), generator=g)[:k]] for _ in range(n)])
    w = torch.rand(n, k, generator=g) + 0.1
    return idx, w


def explicit(x, idx, w, up, down):
    """out[i] = sum_j w[i, j] * down_e(relu(up_e x_i)^2), e = idx[i, j]; float64."""
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float64)
    for i in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[i, j])
            hidden = torch.clamp(up[e].double() @ x[i].double(), min=0.0) ** 2
            out[i] += float(w[i, j]) * (down[e].double() @ hidden)
    return out


def grouped_mm_works() -> bool:
    if not hasattr(F, "grouped_mm"):
        return False
    try:
        F.grouped_mm(torch.randn(4, 8), torch.randn(2, 8, 8), offs=torch.tensor([1, 4], dtype=torch.int32))
        return True
    except (RuntimeError, NotImplementedError):
        return False


IMPLS = ["segments", pytest.param("grouped", marks=pytest.mark.skipif(not grouped_mm_works(), reason="no grouped_mm"))]
CASES = [
    # (tokens, k, experts that get tokens)
    (1, 1, [3]),  # a single token, k = 1
    (1, 3, [0, 5, 7]),
    (7, 1, [1, 2]),  # k = 1, most experts empty
    (13, 2, [0, 2, 3, 6]),  # experts 1, 4, 5, 7 empty (incl. the first and the last index pattern)
    (32, 3, list(range(N_EXPERTS))),  # every expert used
    (9, 2, [6, 7]),  # only the last experts: leading empty segments
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n,k,used", CASES)
def test_experts_match_dense_reference(impl, n, k, used):
    up, down = weights()
    x = torch.randn(n, HID, generator=torch.Generator().manual_seed(n))
    idx, w = routing(n, k, used, seed=n + k)
    got = moe_experts(x, idx, w, up, down, impl=impl)
    dense = moe_experts_ref(x, idx, w, up, down)
    assert got.shape == x.shape and got.dtype == x.dtype
    torch.testing.assert_close(got, dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dense.double(), explicit(x, idx, w, up, down), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n,k,used", CASES)
def test_gathered_experts_match_dense_reference(n, k, used):
    up, down = weights()
    x = torch.randn(n, HID, generator=torch.Generator().manual_seed(n))
    idx, w = routing(n, k, used, seed=n + k)
    torch.testing.assert_close(moe_experts_gathered(x, idx, w, up, down), moe_experts_ref(x, idx, w, up, down),
                               rtol=1e-5, atol=1e-5)  # fmt: skip


def test_static_experts_compiled_take_the_gathered_form():
    """Compiled, the static path is the gathered form (one graph, same values); eagerly the dense one."""
    up, down = weights()
    x = torch.randn(5, HID, generator=torch.Generator().manual_seed(5))
    idx, w = routing(5, 2, [0, 3, 4, 7], seed=1)
    seen = []
    compiled = torch.compile(lambda *a: moe_experts_static(*a), fullgraph=True, dynamic=False, backend=lambda gm, _: (
        seen.extend(str(n.target) for n in gm.graph.nodes), gm.forward)[1])  # fmt: skip
    torch.testing.assert_close(compiled(x, idx, w, up, down), moe_experts_ref(x, idx, w, up, down),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    assert not any("scatter_add" in t for t in seen) and any("einsum" in t for t in seen), seen


def test_auto_on_cpu_and_bad_impl():
    up, down = weights()
    x = torch.randn(5, HID)
    idx, w = routing(5, 2, [1, 4, 6])
    torch.testing.assert_close(moe_experts(x, idx, w, up, down), moe_experts_ref(x, idx, w, up, down))
    with pytest.raises(ValueError):
        moe_experts(x, idx, w, up, down, impl="nope")


def test_bf16_experts_close_to_fp32():
    up, down = weights()
    x = torch.randn(11, HID)
    idx, w = routing(11, 2, [0, 1, 5, 6])
    got = moe_experts(x.bfloat16(), idx, w, up.bfloat16(), down.bfloat16(), impl="segments")
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), moe_experts_ref(x, idx, w, up, down), rtol=5e-2, atol=5e-2)


# ---- router ---------------------------------------------------------------------------------------------


def make_router(name: str, seed: int = 0, **changes) -> tuple[TopkRouter, object]:
    cfg = preset(name).replace(**changes)
    router = TopkRouter(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=g) * 0.5)
        # a bias large enough to change which experts (and groups) win, as the correction bias does
        router.e_score_correction_bias.copy_(torch.randn(cfg.n_routed_experts, generator=g) * 0.3)
    return router, cfg


def check_router(router, cfg, x):
    idx, w = router(x)
    assert idx.shape == (x.shape[0], cfg.num_experts_per_tok) and w.dtype == torch.float32
    for i in range(x.shape[0]):
        experts, weights_ = route(x[i], router, cfg)
        got = dict(zip(idx[i].tolist(), w[i].tolist(), strict=True))
        assert sorted(got) == sorted(experts), f"token {i}: {sorted(got)} vs {sorted(experts)}"
        for e, v in zip(experts, weights_, strict=True):
            assert abs(got[e] - v) <= 1e-5 * max(1.0, abs(v))


@pytest.mark.parametrize("router_dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", ["tiny", "tiny-grouped"])
def test_router_matches_explicit(name, router_dtype):
    router, cfg = make_router(name, router_dtype=router_dtype)
    x = torch.randn(64, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    check_router(router, cfg, x)


def test_group_limit_and_bias_matter_in_test_data():
    # guard against a vacuous router test: with tiny-grouped's data the group limit and the correction
    # bias each change the selection of some tokens
    router, cfg = make_router("tiny-grouped")
    x = torch.randn(64, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    no_groups = cfg.replace(n_group=1, topk_group=1)
    unbiased = TopkRouter(cfg)
    unbiased.weight.data.copy_(router.weight.data)
    diff_group = sum(
        sorted(route(x[i], router, cfg)[0]) != sorted(route(x[i], router, no_groups)[0]) for i in range(64)
    )
    diff_bias = sum(sorted(route(x[i], router, cfg)[0]) != sorted(route(x[i], unbiased, cfg)[0]) for i in range(64))
    assert cfg.n_group == 2 and diff_group > 0 and diff_bias > 0


def test_weights_are_normalised_unbiased_scores():
    router, cfg = make_router("tiny")
    x = torch.randn(16, cfg.hidden_size)
    idx, w = router(x)
    # norm_topk_prob: weights sum to routed_scaling_factor, and ratios are ratios of sigmoid scores
    torch.testing.assert_close(w.sum(-1), torch.full((16,), cfg.routed_scaling_factor))
    s = torch.sigmoid(x @ router.weight.T).gather(1, idx)
    torch.testing.assert_close(w[:, 0] / w[:, 1], s[:, 0] / s[:, 1], rtol=1e-5, atol=1e-6)


def test_float64_router_resolves_a_float32_tie():
    # experts 0 and 1 differ by 1e-8 in one logit: invisible in float32 (ulp near 0.5 is 6e-8; torch's
    # top-k then happens to pick expert 1), exact in float64 (expert 0 wins). Expert 2 is clearly best,
    # so the second slot is decided by that 1e-8 only when the router really computes in float64.
    picks = {}
    for router_dtype in ("float32", "float64"):
        router, cfg = make_router("tiny", router_dtype=router_dtype)
        with torch.no_grad():
            router.weight.zero_()
            router.e_score_correction_bias.zero_()
            router.weight[0, 0], router.weight[0, 1] = 0.5, 1e-8
            router.weight[1, 0] = 0.5
            router.weight[2, 0] = 2.0
            router.weight[3:, 0] = -1.0
        x = torch.zeros(1, cfg.hidden_size)
        x[0, 0], x[0, 1] = 1.0, 1.0
        picks[router_dtype] = sorted(router(x)[0][0].tolist())
    assert picks["float64"] == [0, 2]
    assert 2 in picks["float32"]  # float32 sees a tie; which of 0 / 1 it keeps is unspecified
