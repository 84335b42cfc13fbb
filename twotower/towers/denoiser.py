"""Denoiser tower: fills a block of masked tokens, conditioned layer by layer on the context tower.

Time conditioning is PixArt-style adaLN-single. t = masked fraction of the block, one value per row:
    emb   = [cos(1000 t f), sin(1000 t f)], f_i = 10000^(-i/128), i < 128      (256 dims, cos first)
    t_emb = t_block(t_embedder(emb))                                          [b, 3d], shared by all layers
    layer i: (shift, scale, gate) = scale_shift_tables[i] + t_emb.view(b, 3, d)
Each layer: Mamba / attention modulate then norm, MoE / MLP norm then modulate; h += gate * mixer(u).
Attention at layer i reads [context-tower K/V of layer i || the block's own K/V], no mask; Mamba layer i
starts from the context tower's conv history and SSM state of layer i and scans the block causally.
`lm_head` gives x0 predictions: position j scores token j of the block (no shift).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .backbone import Backbone, LayerRun
from .config import NemotronHConfig
from .pool import StatePool
from .state import ContextState

FREQ_DIM = 256
MAX_PERIOD = 10000.0
TIME_SCALE = 1000.0


def timestep_sinusoid(t: Tensor) -> Tensor:
    """t [b] (already in the model dtype) -> [b, 256] float32, cos half first."""
    half = FREQ_DIM // 2
    freqs = torch.exp(-math.log(MAX_PERIOD) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (t * TIME_SCALE).float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQ_DIM, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: Tensor) -> Tensor:
        dtype = self.mlp[0].weight.dtype
        t = t.to(dtype)  # t passes through the model dtype before the sinusoid, as in the reference
        return self.mlp(timestep_sinusoid(t).to(dtype))


class DenoiserTower(nn.Module):
    def __init__(self, cfg: NemotronHConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(d, cfg.vocab_size, bias=False)
        self.t_embedder = TimestepEmbedder(d)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(d, 3 * d))
        self.scale_shift_tables = nn.ParameterList(
            nn.Parameter(torch.zeros(3, d)) for _ in range(cfg.num_hidden_layers)
        )

    def time_embedding(self, t: Tensor) -> Tensor:
        """t [b] in [0, 1] -> [b, 3, d]."""
        return self.t_block(self.t_embedder(t)).view(t.shape[0], 3, self.cfg.hidden_size)

    @torch.no_grad()
    def denoise(self, xt: Tensor, t: Tensor, ctx: ContextState) -> Tensor:
        """xt [b, S] block tokens (masked positions hold the mask id), t [b] masked fraction per row,
        ctx: the context tower's state after every committed token (read only).
        Returns x0 logits [b, S, vocab] float32."""
        if xt.dim() != 2 or xt.shape[0] != ctx.batch_size:
            raise ValueError(f"xt: expected [batch={ctx.batch_size}, block], got {tuple(xt.shape)}")
        if t.shape != (xt.shape[0],):
            raise ValueError(f"t: expected shape [{xt.shape[0]}], got {tuple(t.shape)}")
        h = self.model.embeddings(xt)
        h = self.model.run(h, ctx, LayerRun(causal=False, write=False, modulation=self._modulation(t)))
        return self.lm_head(h).float()

    def _modulation(self, t: Tensor):
        temb = self.time_embedding(t)  # [b, 3, d]

        def modulation(i: int) -> tuple[Tensor, Tensor, Tensor]:
            sst = (self.scale_shift_tables[i][None] + temb)[:, :, None, :]  # [b, 3, 1, d]
            return sst[:, 0], sst[:, 1], sst[:, 2]

        return modulation

    def denoise_slots(self, xt: Tensor, t: Tensor, pool: StatePool, slots: Tensor, window: int) -> Tensor:
        """`denoise` over the context tower's state pool (read only; Backbone.run_slots): x0 logits
        [b, S, vocab] float32 for the sequences in `slots` [b]. Static shapes."""
        h = self.model.embeddings(xt)
        h = self.model.run_slots(h, pool, slots, window, LayerRun(causal=False, write=False,
                                                                  modulation=self._modulation(t)))  # fmt: skip
        return self.lm_head(h).float()

    def mock_ar_slots(self, last: Tensor, pool: StatePool, slots: Tensor, window: int) -> Tensor:
        """`mock_ar_step` over a state pool (read only): next-token logits [b, vocab] float32."""
        h = self.model.embeddings(last[:, None])
        h = self.model.run_slots(h, pool, slots, window, LayerRun(causal=True, write=False))
        return self.lm_head(h[:, 0]).float()

    @torch.no_grad()
    def mock_ar_step(self, last: Tensor, ctx: ContextState) -> Tensor:
        """Mock-AR: the denoiser without time conditioning reads the last committed token, last [b],
        over a context state that covers every committed token *before* it; returns next-token logits
        [b, vocab] float32. The state is not modified."""
        h = self.model.embeddings(last[:, None])
        h = self.model.run(h, ctx, LayerRun(causal=True, write=False))
        return self.lm_head(h[:, 0]).float()
