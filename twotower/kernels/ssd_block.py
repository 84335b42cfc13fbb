"""SSD scan of one short block (l <= 64) from a seeded state, optionally through a state-slot pool.

Plain-PyTorch reference (`ssd_block_scan_ref`) of the Triton kernel in twotower/kernels/triton_ssd.py; both share
the contract below (axis legend and recurrence as in twotower/kernels/ssd.py):

    x [b, l, h, p], dt [b, l, h] (discretised, float32; dt = 0 = identity step), A [h] (negative),
    B, C [b, l, g, n] (head j reads group j // (h // g)), D [h] or None.
    initial_state: without `state_slots`, [b, h, p, n] (row r starts from initial_state[r]);
                   with `state_slots` [b] (int), a state POOL [slots, h, p, n]: row r starts from
                   initial_state[state_slots[r]]. None = zero state.
    out_state:     where the final states go, in place, indexed like initial_state (a pool row
                   out_state[state_slots[r]] with slots, else out_state[r]). Passing the pool itself as
                   both initial_state and out_state is the in-place slot update: no gather/scatter copy.
                   Rows not named by state_slots are left untouched. Slots must be distinct when writing.
    Returns (y [b, l, h, p] float32, state):
        state = the final state per row [b, h, p, n] float32 (a new tensor) when out_state is None,
              = out_state itself when it is given,
              = the state after every position [b, l, h, p, n] float32 with return_all_states
                (out_state, if given, still receives the final state).

The states are float32 inside whatever the input dtypes (bf16 inputs are upcast); out_state may have
another float dtype (the value is cast on store).
"""

from __future__ import annotations

from torch import Tensor

from .ssd import ssd_scan_ref

MAX_BLOCK_LEN = 64  # the Triton kernel holds the [l, l] decay matrix of one block in registers


def check_block_args(x, dt, A, B, C, D, initial_state, state_slots, out_state) -> None:
    """Shape checks shared by the reference and the Triton launcher (cheap, no device sync)."""
    bsz, seqlen, nheads, hdim = x.shape
    ngroups, dstate = B.shape[-2:]
    assert 1 <= seqlen <= MAX_BLOCK_LEN, f"block length {seqlen} not in 1..{MAX_BLOCK_LEN}"
    assert dt.shape == (bsz, seqlen, nheads), dt.shape
    assert B.shape == C.shape == (bsz, seqlen, ngroups, dstate), (B.shape, C.shape)
    assert nheads % ngroups == 0, (nheads, ngroups)
    assert A.shape == (nheads,) and (D is None or D.shape == (nheads,))
    for name, s in (("initial_state", initial_state), ("out_state", out_state)):
        if s is None:
            continue
        assert s.shape[1:] == (nheads, hdim, dstate), (name, s.shape)
        assert state_slots is not None or s.shape[0] == bsz, (name, s.shape)
    if state_slots is not None:
        assert state_slots.shape == (bsz,) and not state_slots.is_floating_point(), state_slots


def ssd_block_scan_ref(
    x: Tensor,  # [b, l, h, p]
    dt: Tensor,  # [b, l, h]
    A: Tensor,  # [h]
    B: Tensor,  # [b, l, g, n]
    C: Tensor,  # [b, l, g, n]
    D: Tensor | None = None,  # [h]
    initial_state: Tensor | None = None,  # [b, h, p, n], or the pool [slots, h, p, n] with state_slots
    *,
    state_slots: Tensor | None = None,  # [b] int: pool row of each batch row
    out_state: Tensor | None = None,  # like initial_state: receives the final states in place
    return_all_states: bool = False,
) -> tuple[Tensor, Tensor]:
    """See the module docstring. The reference gathers the pool rows, runs `ssd_scan_ref` with one chunk
    covering the block, and scatters the final states back."""
    check_block_args(x, dt, A, B, C, D, initial_state, state_slots, out_state)
    rows = state_slots.long() if state_slots is not None else None
    s0 = initial_state
    if s0 is not None and rows is not None:
        s0 = s0.index_select(0, rows)  # gather: [b, h, p, n]
    seqlen = x.shape[1]
    y, state = ssd_scan_ref(x, dt, A, B, C, D, s0, chunk_size=seqlen, return_all_states=return_all_states)
    if out_state is None:
        return y, state
    final = state[:, -1] if return_all_states else state
    if rows is not None:
        out_state.index_copy_(0, rows, final.to(out_state.dtype))  # scatter into the pool
    else:
        out_state.copy_(final)
    return y, (state if return_all_states else out_state)
