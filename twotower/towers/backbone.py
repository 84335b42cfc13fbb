"""The NemotronH stack: embeddings, pre-norm residual blocks built from the pattern string, final norm.

One layer loop serves every tower operation; what differs is passed in:
    context tower   causal attention, state written back (prefill, block extension, decode)
    denoiser block  full attention over [context || block], state read only, adaLN modulation
    mock-AR step    like the denoiser block with one token and no modulation
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .attention import Attention
from .config import ATTENTION, MAMBA, MOE, NemotronHConfig
from .config import MLP as MLP_KIND
from .mamba2 import Mamba2Mixer
from .moe import MLP, MoE
from .norm import RMSNorm
from .pool import StatePool
from .state import AttentionState, BlockInputs, ContextState, MambaState, MambaTrace

# Per layer i: (shift, scale, gate), each [b, 1, d].
Modulation = Callable[[int], tuple[Tensor, Tensor, Tensor]]


def build_mixer(kind: str, cfg: NemotronHConfig) -> nn.Module:
    if kind == MAMBA:
        return Mamba2Mixer(cfg)
    if kind == ATTENTION:
        return Attention(cfg)
    if kind == MOE:
        return MoE(cfg)
    if kind == MLP_KIND:
        return MLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)
    raise ValueError(f"pattern: unknown layer kind {kind!r}")


class Block(nn.Module):
    def __init__(self, kind: str, cfg: NemotronHConfig) -> None:
        super().__init__()
        self.kind = kind
        self.norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.mixer = build_mixer(kind, cfg)


@dataclass
class LayerRun:
    """How one pass over the stack treats state (see module docstring)."""

    causal: bool  # attention mask inside the new chunk
    write: bool  # keep the advanced state in `state` (context tower)
    n_valid: Tensor | None = None  # [b] real tokens per right-padded row
    modulation: Modulation | None = None
    traces: dict[int, MambaTrace] | None = None  # filled per Mamba layer when given (rollback)
    record: dict[int, BlockInputs] | None = None  # pool steps: Mamba layers record, not advance (verify)


class Backbone(nn.Module):
    def __init__(self, cfg: NemotronHConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(k, cfg) for k in cfg.pattern)
        self.norm_f = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)

    def new_state(self, batch: int, capacity: int, device=None, dtype=None) -> ContextState:
        """Zero state for `batch` empty sequences, KV room for `capacity` tokens."""
        ref = self.norm_f.weight
        device = ref.device if device is None else device
        dtype = self.embeddings.weight.dtype if dtype is None else dtype
        layers = []
        for kind in self.cfg.pattern:
            if kind == MAMBA:
                spec = Mamba2Mixer.state_spec(self.cfg, batch, dtype)
                layers.append(MambaState(**{k: torch.zeros(s, dtype=d, device=device) for k, (s, d) in spec.items()}))
            elif kind == ATTENTION:
                spec = Attention.state_spec(self.cfg, batch, capacity, dtype)
                layers.append(AttentionState(**{k: torch.zeros(s, dtype=d, device=device)
                                                for k, (s, d) in spec.items()}))  # fmt: skip
            else:
                layers.append(None)
        return ContextState(layers, torch.zeros(batch, dtype=torch.long, device=device))

    @staticmethod
    def _input(block: Block, h: Tensor, mod: tuple[Tensor, Tensor, Tensor] | None) -> Tensor:
        if mod is None:
            return block.norm(h)
        shift, scale, _ = mod
        if block.kind in (MAMBA, ATTENTION):  # modulate, then norm
            return block.norm(h * (1 + scale) + shift)
        return block.norm(h) * (1 + scale) + shift  # norm, then modulate

    @staticmethod
    def _residual(h: Tensor, y: Tensor, mod: tuple[Tensor, Tensor, Tensor] | None) -> Tensor:
        return h + (mod[2] * y if mod is not None else y)

    def run_slots(self, h: Tensor, pool: StatePool, slots: Tensor, window: int, how: LayerRun) -> Tensor:
        """Static-shape `run` over a state pool: h [b, l, d] for the sequences in `slots` [b] -> final-normed
        hidden [b, l, d]. Attention reads the first `window` cached positions of each slot (masked by its
        length; the caller picks window >= every length); shapes depend only on (b, l, window), and no
        value is read back to the host, so the pass compiles to one graph and replays as one CUDA graph.
        With how.write the slots advance by the input (lengths included); K/V rows past a row's n_valid
        are written too but lie past its new length, so they stay masked until overwritten."""
        seqlen = h.shape[1]
        lengths = pool.lengths[slots]
        for i, block in enumerate(self.layers):
            mod = how.modulation(i) if how.modulation is not None else None
            u = self._input(block, h, mod)
            st = pool.layers[i]
            if block.kind == MAMBA:
                rec: list[BlockInputs] | None = [] if how.record is not None else None
                y = block.mixer.forward_slots(u, st, slots, how.n_valid, how.write, rec)
                if rec:
                    how.record[i] = rec[0]
            elif block.kind == ATTENTION:
                y = block.mixer.forward_slots(u, st, lengths, slots, window, how.causal, how.write)
            elif block.kind == MOE:
                y = block.mixer(u, static=True)
            else:
                y = block.mixer(u)
            h = self._residual(h, y, mod)
        if how.write:  # padding rows (the scratch slot) stay at length 0, so their writes stay in range
            grown = lengths + (how.n_valid if how.n_valid is not None else seqlen)
            pool.lengths[slots] = torch.where(slots == pool.scratch, 0, grown)
        return self.norm_f(h)

    def advance_slots(self, pool: StatePool, slots: Tensor, record: dict[int, BlockInputs], n: Tensor) -> None:
        """After a recorded pass (LayerRun.record): advance every Mamba layer's pool rows by n[r] tokens."""
        for i, block in enumerate(self.layers):
            if block.kind == MAMBA:
                block.mixer.advance_slots(pool.layers[i], slots, record[i], n)

    def run(self, h: Tensor, state: ContextState, how: LayerRun) -> Tensor:
        """h [b, l, d] embedded tokens -> final-normed hidden [b, l, d].

        With how.write the state advances by the input (lengths included); otherwise it is untouched."""
        bsz, seqlen, _ = h.shape
        lengths = state.lengths
        ctx_len = state.max_length
        uniform = bool((lengths == ctx_len).all().item())
        if how.write:
            state.ensure_capacity(ctx_len + seqlen)
        step_inplace = how.write and seqlen == 1 and how.n_valid is None
        for i, block in enumerate(self.layers):
            kind = block.kind
            mod = how.modulation(i) if how.modulation is not None else None
            u = self._input(block, h, mod)
            if kind == MAMBA:
                tr: list[MambaTrace] | None = [] if how.traces is not None else None
                y, new = block.mixer(u, state.layers[i], n_valid=how.n_valid, inplace=step_inplace, trace=tr)
                if tr:
                    how.traces[i] = tr[0]
                if how.write:
                    state.layers[i] = new
            elif kind == ATTENTION:
                y = block.mixer(u, state.layers[i], lengths, ctx_len, uniform, how.causal, how.write)
            else:
                y = block.mixer(u)
            h = self._residual(h, y, mod)
        if how.write:
            state.lengths = lengths + (how.n_valid if how.n_valid is not None else seqlen)
        return self.norm_f(h)
