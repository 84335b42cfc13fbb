"""Causal depthwise conv1d (twotower/kernels/conv1d.py) against explicit loops.

Layouts as in the kernel: x [b, d, l], weight [d, w], state [b, d, w] = last w raw columns (newest last),
history [b, d, w - 1] = the raw columns before x.
"""

from __future__ import annotations

import pytest
import torch

from twotower.kernels import causal_conv1d_ref, causal_conv1d_update_ref, conv_state_after


def explicit_conv(x, weight, bias, history):
    """y[b, c, t] = bias[c] + sum_k weight[c, k] * xx[b, c, t + k], xx = [history | x]; float64 loop."""
    b, d, l = x.shape
    w = weight.shape[1]
    if history is None:
        history = torch.zeros(b, d, w - 1)
    xx = torch.cat([history[..., -(w - 1) :], x], dim=-1).double()
    y = torch.zeros(b, d, l, dtype=torch.float64)
    for t in range(l):
        for k in range(w):
            y[:, :, t] += weight[:, k].double() * xx[:, :, t + k]
        if bias is not None:
            y[:, :, t] += bias.double()
    return y


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("with_history", [True, False])
# lengths up to SHIFTED_SUM_MAX_LEN take the shifted multiply-add path, 200 the conv1d one
@pytest.mark.parametrize("length,width", [(1, 4), (3, 4), (4, 4), (17, 4), (9, 2), (9, 5), (200, 4)])
def test_sequence_conv_matches_loop(length, width, with_history, with_bias):
    x, weight = rand(2, 6, length, seed=1), rand(6, width, seed=2)
    bias = rand(6, seed=3) if with_bias else None
    history = rand(2, 6, width - 1, seed=4) if with_history else None
    y = causal_conv1d_ref(x, weight, bias, history)
    torch.testing.assert_close(y.double(), explicit_conv(x, weight, bias, history), rtol=1e-5, atol=1e-5)


def test_longer_history_uses_its_last_columns():
    # the Mamba mixer passes state[..., 1:] (w - 1 columns); a longer history must use its newest w - 1
    x, weight, bias = rand(2, 6, 5, seed=1), rand(6, 4, seed=2), rand(6, seed=3)
    long_hist = rand(2, 6, 7, seed=4)
    y = causal_conv1d_ref(x, weight, bias, long_hist)
    torch.testing.assert_close(y.double(), explicit_conv(x, weight, bias, long_hist[..., -3:]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("length", [1, 3, 10])
def test_update_steps_equal_sequence_conv(length):
    x, weight, bias = rand(2, 6, length, seed=1), rand(6, 4, seed=2), rand(6, seed=3)
    state0 = rand(2, 6, 4, seed=4)
    state = state0.clone()
    ys = []
    for t in range(length):
        prev, snapshot = state, state.clone()
        y_t, state = causal_conv1d_update_ref(x[:, :, t], prev, weight, bias)
        assert torch.equal(prev, snapshot), "input state must not be modified"
        ys.append(y_t)
    y_seq = causal_conv1d_ref(x, weight, bias, history=state0[..., 1:])
    torch.testing.assert_close(torch.stack(ys, -1), y_seq, rtol=1e-5, atol=1e-5)
    # the state after the steps is the last 4 raw columns of [state0 | x]
    torch.testing.assert_close(state, torch.cat([state0, x], -1)[..., -4:], rtol=0, atol=0)
    torch.testing.assert_close(state, conv_state_after(state0, x, None), rtol=0, atol=0)


def explicit_state_after(state, x, n_valid):
    """Row by row: the last w raw columns of [state | the row's real columns]."""
    w = state.shape[-1]
    rows = []
    for r in range(x.shape[0]):
        n = x.shape[-1] if n_valid is None else int(n_valid[r])
        seq = torch.cat([state[r], x[r, :, :n]], dim=-1)
        rows.append(seq[:, -w:])
    return torch.stack(rows)


@pytest.mark.parametrize("length", [1, 2, 3, 4, 5, 12])
def test_conv_state_after_ragged(length):
    # rows with every count from 0 real columns up to the full length, incl. fewer than the kernel width,
    # where part of the previous state must survive (shifted left)
    state, x = rand(length + 1, 5, 4, seed=1), rand(length + 1, 5, length, seed=2)
    n_valid = torch.arange(length + 1)  # row r has r real columns
    got = conv_state_after(state, x, n_valid)
    torch.testing.assert_close(got, explicit_state_after(state, x, n_valid), rtol=0, atol=0)
    torch.testing.assert_close(conv_state_after(state, x, None), explicit_state_after(state, x, None), rtol=0, atol=0)


def test_conv_state_after_short_row_explicit_columns():
    # spelled out once: w = 4, a row with 2 real columns keeps [s2, s3, x0, x1]
    state = torch.arange(4.0).view(1, 1, 4)  # s0..s3 = 0, 1, 2, 3
    x = torch.tensor([[[10.0, 11.0, 99.0, 99.0, 99.0]]])  # 2 real, 3 padding
    got = conv_state_after(state, x, torch.tensor([2]))
    assert got.tolist() == [[[2.0, 3.0, 10.0, 11.0]]]
    got = conv_state_after(state, x[..., :2], None)
    assert got.tolist() == [[[2.0, 3.0, 10.0, 11.0]]]


def test_bf16_conv_close_to_fp32():
    x, weight, bias = rand(2, 8, 9, seed=1), rand(8, 4, seed=2), rand(8, seed=3)
    hist = rand(2, 8, 3, seed=4)
    y = causal_conv1d_ref(x.bfloat16(), weight.bfloat16(), bias.bfloat16(), hist.bfloat16())
    assert y.dtype == torch.bfloat16
    ref = explicit_conv(
        x.bfloat16().float(), weight.bfloat16().float(), bias.bfloat16().float(), hist.bfloat16().float()
    )
    torch.testing.assert_close(y.double(), ref, rtol=2e-2, atol=2e-2)
