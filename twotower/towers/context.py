"""Context tower: the autoregressive NemotronH that reads the prompt and every committed token.

All operations are one causal pass that appends to a ContextState:
    prefill(ids)            new state from prompts
    extend(ids, state)      consume a committed block of S tokens (KV appended, Mamba states advanced)
    decode(ids, state)      one token per row (recurrent step kernels)
and `logits` turns hidden states at any position into the context LM head's next-token logits.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .backbone import Backbone, LayerRun
from .config import NemotronHConfig
from .pool import StatePool
from .state import BlockInputs, ContextState, MambaTrace


class ContextTower(nn.Module):
    def __init__(self, cfg: NemotronHConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def new_state(self, batch: int, capacity: int = 256) -> ContextState:
        return self.model.new_state(batch, capacity)

    def logits(self, hidden: Tensor) -> Tensor:
        """hidden [..., d] -> float32 logits [..., vocab] (position j predicts token j + 1)."""
        return self.lm_head(hidden).float()

    def forward(
        self,
        ids: Tensor,
        state: ContextState,
        n_valid: Tensor | None = None,
        traces: dict[int, MambaTrace] | None = None,
    ) -> Tensor:
        """ids [b, l] appended to `state` in place -> final hidden states [b, l, d].

        n_valid [b]: right-padded rows; row r reads only ids[r, :n_valid[r]] (0 leaves the row as it is).
        traces: when a dict is given, every Mamba layer's intermediate states are recorded in it, so
        that `state.rewind` can keep any prefix of the new tokens afterwards."""
        if ids.dim() != 2 or ids.shape[0] != state.batch_size:
            raise ValueError(f"ids: expected [batch={state.batch_size}, len], got {tuple(ids.shape)}")
        if n_valid is not None and ((n_valid < 0) | (n_valid > ids.shape[1])).any():
            raise ValueError(f"n_valid: each row needs 0..{ids.shape[1]} tokens, got {n_valid.tolist()}")
        h = self.model.embeddings(ids)
        return self.model.run(h, state, LayerRun(causal=True, write=True, n_valid=n_valid, traces=traces))

    def forward_slots(
        self,
        ids: Tensor,
        pool: StatePool,
        slots: Tensor,
        window: int,
        n_valid: Tensor | None = None,
        record: dict[int, BlockInputs] | None = None,
    ) -> Tensor:
        """`forward` over a state pool (Backbone.run_slots): ids [b, l] appended to the sequences in
        `slots` [b] -> final hidden states [b, l, d]. Static shapes: compiles once per (b, l, window).
        With `record` (verify) the Mamba states stay where they were and each layer's block inputs are
        recorded instead: `advance_slots` then keeps any prefix."""
        h = self.model.embeddings(ids)
        return self.model.run_slots(h, pool, slots, window, LayerRun(causal=True, write=True, n_valid=n_valid,
                                                                     record=record))  # fmt: skip

    def advance_slots(self, pool: StatePool, slots: Tensor, record: dict[int, BlockInputs], n: Tensor) -> None:
        """After a recorded forward_slots: the Mamba states of `slots` advance by n[r] tokens of the block."""
        self.model.advance_slots(pool, slots, record, n)

    @torch.no_grad()
    def prefill(
        self, ids: Tensor, n_valid: Tensor | None = None, capacity: int | None = None
    ) -> tuple[ContextState, Tensor]:
        """Prompts [b, l] -> (state, logits at each row's last token [b, vocab])."""
        state = self.new_state(ids.shape[0], capacity or max(ids.shape[1], 16))
        return state, self.extend(ids, state, n_valid)

    @torch.no_grad()
    def extend(self, ids: Tensor, state: ContextState, n_valid: Tensor | None = None) -> Tensor:
        """Consume committed tokens [b, l]; returns the logits at each row's last real token."""
        hidden = self(ids, state, n_valid)
        if n_valid is None:
            return self.logits(hidden[:, -1])
        last = (n_valid - 1).clamp(min=0).to(torch.long)
        return self.logits(hidden[torch.arange(ids.shape[0], device=ids.device), last])

    @torch.no_grad()
    def verify(
        self, ids: Tensor, state: ContextState, n_valid: Tensor | None = None
    ) -> tuple[Tensor, Tensor, dict[int, MambaTrace]]:
        """Read a drafted block ids [b, l] like `extend`, keeping what a rollback needs.

        Returns (logits [b, l, vocab] at every position, lengths before the block, Mamba traces); then
        `state.rewind(base, traces, keep)` keeps the first keep[r] tokens of row r."""
        base = state.lengths.clone()
        traces: dict[int, MambaTrace] = {}
        hidden = self(ids, state, n_valid, traces=traces)
        return self.logits(hidden), base, traces

    @torch.no_grad()
    def decode(self, ids: Tensor, state: ContextState) -> Tensor:
        """One token per row, ids [b] -> next-token logits [b, vocab]."""
        return self.logits(self(ids[:, None], state)[:, 0])
