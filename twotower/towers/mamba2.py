"""Mamba-2 mixer of NemotronH.

Shapes (b batch, l tokens, d hidden; h heads, p head dim, g groups, n state size, k conv kernel):
    in_proj(u) [b, l, d_inner + conv_dim + h], split  z | xBC | dt
    xBC -> causal depthwise conv (history = last k-1 raw columns) -> silu -> x [h*p] | B [g*n] | C [g*n]
    dt = softplus(dt + dt_bias), clamped to time_step_limit; A = -exp(A_log)
    SSD scan (float32) from the given SSM state; y += D x
    y = rmsnorm_per_group(y * silu(z)) * norm.weight; out_proj(y) [b, l, d]
The mixer is functional: it reads a MambaState and returns the state after the input; the caller
decides whether to keep it (context tower) or drop it (denoiser).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from twotower import kernels

from .config import NemotronHConfig
from .norm import GatedGroupRMSNorm
from .state import BlockInputs, MambaState, MambaTrace


class Mamba2Mixer(nn.Module):
    def __init__(self, cfg: NemotronHConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.nheads, self.hdim = cfg.mamba_num_heads, cfg.mamba_head_dim
        self.ngroups, self.dstate = cfg.n_groups, cfg.ssm_state_size
        self.d_inner, self.conv_dim = cfg.d_inner, cfg.conv_dim
        self.in_proj = nn.Linear(cfg.hidden_size, cfg.in_proj_dim, bias=cfg.mamba_bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, cfg.conv_kernel, groups=self.conv_dim,
                                padding=cfg.conv_kernel - 1, bias=cfg.use_conv_bias)  # fmt: skip
        self.dt_bias = nn.Parameter(torch.zeros(self.nheads))
        self.A_log = nn.Parameter(torch.zeros(self.nheads))
        self.D = nn.Parameter(torch.ones(self.nheads))
        self.norm = GatedGroupRMSNorm(self.d_inner, self.d_inner // self.ngroups, cfg.layer_norm_epsilon)
        self.out_proj = nn.Linear(self.d_inner, cfg.hidden_size, bias=cfg.mamba_bias)

    @staticmethod
    def state_spec(cfg: NemotronHConfig, batch: int, dtype: torch.dtype) -> dict[str, tuple[tuple, torch.dtype]]:
        ssm_dtype = getattr(torch, cfg.mamba_ssm_cache_dtype)
        return {
            "conv": ((batch, cfg.conv_dim, cfg.conv_kernel), dtype),
            "ssm": ((batch, cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.ssm_state_size), ssm_dtype),
        }

    def _dt(self, dt_raw: Tensor) -> Tensor:
        dt = F.softplus(dt_raw.float() + self.dt_bias.float())
        lo, hi = self.cfg.time_step_limit
        if lo > 0.0 or math.isfinite(hi):
            dt = dt.clamp(min=lo, max=hi)
        return dt

    def forward(
        self,
        u: Tensor,
        state: MambaState,
        n_valid: Tensor | None = None,
        inplace: bool = False,
        trace: list[MambaTrace] | None = None,
    ) -> tuple[Tensor, MambaState]:
        """u [b, l, d] -> (out [b, l, d], state after the input).

        n_valid [b]: rows are right-padded, row r has n_valid[r] real tokens (dt = 0 past them, so its
        state stops there). `inplace` lets a one-token call use the recurrent step kernels, which may
        overwrite `state`'s tensors; without it the input state is never modified. With `trace` (a list),
        the states after every prefix of the input are appended to it as a MambaTrace (for rollback)."""
        bsz, seqlen, _ = u.shape
        z, xBC, dt_raw = torch.split(self.in_proj(u), [self.d_inner, self.conv_dim, self.nheads], dim=-1)
        weight = self.conv1d.weight[:, 0, :]  # [conv_dim, k]
        A = -torch.exp(self.A_log.float())
        dt = self._dt(dt_raw)  # [b, l, h] float32
        gn = self.ngroups * self.dstate
        if seqlen == 1 and n_valid is None and inplace and trace is None:
            conv_out, conv_state = kernels.causal_conv1d_update(xBC[:, 0], state.conv, weight, self.conv1d.bias)
            x, B, C = torch.split(F.silu(conv_out), [self.d_inner, gn, gn], dim=-1)
            y, ssm = kernels.ssd_step(
                state.ssm, x.view(bsz, self.nheads, self.hdim), dt[:, 0], A,
                B.view(bsz, self.ngroups, self.dstate), C.view(bsz, self.ngroups, self.dstate), self.D,
            )  # fmt: skip
            y = y.reshape(bsz, 1, self.d_inner)
        else:
            xBC_t = xBC.transpose(1, 2)  # [b, conv_dim, l]
            conv_out = kernels.causal_conv1d(xBC_t, weight, self.conv1d.bias, history=state.conv[..., 1:])
            conv_state = kernels.conv_state_after(state.conv, xBC_t, n_valid)
            x, B, C = torch.split(F.silu(conv_out.transpose(1, 2)), [self.d_inner, gn, gn], dim=-1)
            if n_valid is not None:
                dt = dt * (torch.arange(seqlen, device=u.device)[None, :] < n_valid[:, None])[..., None]
            y, ssm = kernels.ssd_scan(
                x.reshape(bsz, seqlen, self.nheads, self.hdim), dt, A,
                B.reshape(bsz, seqlen, self.ngroups, self.dstate),
                C.reshape(bsz, seqlen, self.ngroups, self.dstate),
                self.D, initial_state=state.ssm, chunk_size=self.cfg.chunk_size,
                return_all_states=trace is not None,
            )  # fmt: skip
            if trace is not None:  # ssm: [b, l, h, p, n], the state after each position
                ssm_all = torch.cat([state.ssm.float()[:, None], ssm], dim=1).to(state.ssm.dtype)
                trace.append(MambaTrace(ssm_all, torch.cat([state.conv, xBC_t.to(state.conv.dtype)], dim=-1)))
                ssm = ssm[:, -1]  # dt = 0 past n_valid, so the last state is each row's final one
            y = y.reshape(bsz, seqlen, self.d_inner)
        out = self.out_proj(self.norm(y.to(u.dtype), z))
        return out, MambaState(conv_state.to(state.conv.dtype), ssm.to(state.ssm.dtype))

    def forward_slots(
        self,
        u: Tensor,  # [b, l, d]
        pool: MambaState,  # this layer's pool rows: conv [slots, conv_dim, k], ssm [slots, h, p, n]
        slots: Tensor,  # [b] pool row of each batch row (padding rows: the scratch slot)
        n_valid: Tensor | None,
        write: bool,
        record: list[BlockInputs] | None = None,
    ) -> Tensor:
        """`forward` over a state pool: row r starts from pool row slots[r]; with `write` the states after
        the input are stored back there in place. A decode token is one fused step (conv update +
        selective state update) on the pool rows; a block is one seeded scan (`_scan_slots`). Only the
        small conv history is gathered.

        With `record` (a list; verify) the state is NOT advanced: the block's inputs are appended to it
        instead, and `advance_slots` later moves the state by the prefix that was kept."""
        bsz, seqlen, _ = u.shape
        write = write and record is None
        z, xBC, dt_raw = torch.split(self.in_proj(u), [self.d_inner, self.conv_dim, self.nheads], dim=-1)
        weight = self.conv1d.weight[:, 0, :]  # [conv_dim, k]
        A = -torch.exp(self.A_log.float())
        dt = self._dt(dt_raw)  # [b, l, h] float32
        if seqlen == 1 and n_valid is None and write:
            y = kernels.mamba_decode_step(xBC[:, 0], pool.conv, weight, self.conv1d.bias, dt[:, 0], A, self.D,
                                          pool.ssm, state_slots=slots)  # fmt: skip
        else:
            xBC_t = xBC.transpose(1, 2)  # [b, conv_dim, l]
            if n_valid is not None:  # dt = 0 past a row's tokens: its state stops there
                dt = dt * (torch.arange(seqlen, device=u.device)[None, :] < n_valid[:, None])[..., None]
            y = self._scan_slots(pool, slots, xBC_t, dt, A, n_valid, write)
            if record is not None:
                record.append(BlockInputs(xBC_t, dt))
        y = y.reshape(bsz, seqlen, self.d_inner)
        return self.out_proj(self.norm(y.to(u.dtype), z))

    def _scan_slots(self, pool: MambaState, slots: Tensor, xBC_t: Tensor, dt: Tensor, A: Tensor,
                    n_valid: Tensor | None, write: bool) -> Tensor:  # fmt: skip
        """Conv + silu + seeded scan of raw columns xBC_t [b, conv_dim, l] from the pool rows (dt already 0
        past each row's tokens); with `write` the states after them go back in place. Up to
        kernels.MAX_BLOCK_LEN tokens one block scan reads and writes the pool rows directly
        (kernels.ssd_block_scan); longer inputs take the chunked scan on a gathered copy of the states.
        Returns y [b, l, h, p] float32."""
        bsz, seqlen = dt.shape[:2]
        gn = self.ngroups * self.dstate
        conv0 = pool.conv[slots]  # [b, conv_dim, k] gathered (small): the conv history
        conv_out = kernels.causal_conv1d(xBC_t, self.conv1d.weight[:, 0, :], self.conv1d.bias, history=conv0[..., 1:])
        x, B, C = torch.split(F.silu(conv_out.transpose(1, 2)), [self.d_inner, gn, gn], dim=-1)
        x = x.reshape(bsz, seqlen, self.nheads, self.hdim)
        B, C = B.reshape(bsz, seqlen, self.ngroups, self.dstate), C.reshape(bsz, seqlen, self.ngroups, self.dstate)
        if seqlen <= kernels.MAX_BLOCK_LEN:
            y, _ = kernels.ssd_block_scan(x, dt, A, B, C, self.D, pool.ssm, state_slots=slots,
                                          out_state=pool.ssm if write else None)  # fmt: skip
        else:
            y, final = kernels.ssd_scan(x, dt, A, B, C, self.D, initial_state=pool.ssm[slots],
                                        chunk_size=self.cfg.chunk_size)  # fmt: skip
            if write:
                pool.ssm[slots] = final.to(pool.ssm.dtype)
        if write:
            pool.conv[slots] = kernels.conv_state_after(conv0, xBC_t, n_valid).to(pool.conv.dtype)
        return y

    def advance_slots(self, pool: MambaState, slots: Tensor, block: BlockInputs, n: Tensor) -> None:
        """Advance the pool rows by the first n[r] tokens of a recorded block (rollback after verify):
        the same conv and scan as the block's forward, with dt = 0 from position n[r] on."""
        seqlen = block.dt.shape[1]
        keep = torch.arange(seqlen, device=n.device)[None, :] < n[:, None]  # [b, l]
        self._scan_slots(pool, slots, block.xBC, block.dt * keep[..., None], -torch.exp(self.A_log.float()), n,
                         write=True)  # fmt: skip
