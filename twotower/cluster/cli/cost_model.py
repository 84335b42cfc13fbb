"""What a generated token costs on memory-bound hardware: exact counts from a batch-1 run, no timing.

At batch 1 on an accelerator a forward is bound by the bytes it reads, not by its FLOPs. A forward of
either tower reads
  - every dense weight once (attention, Mamba, shared expert, router, norms, lm_head; the embedding
    table only at the rows it looks up);
  - every routed expert that at least one of its tokens is routed to, in each MoE layer: a 16-token
    block touches many more distinct experts than a 1-token AR step, which is the whole question;
  - its state: the attention KV of the context so far (the denoiser reads the context tower's), and each
    Mamba layer's conv and SSM state (read and written by the context tower, read by the denoiser).
Activations are not counted. Every element is 2 bytes (bf16 weights, KV and states, as served on GPUs).

`CostMeter` counts these for the forwards of a generation (the prompt's prefill excluded: every mode pays
it alike) by hooking the routers of both towers and the step entry points of the in-process runners.
The distinct experts per MoE layer are counted from the router's top-k, so they are exact for this model.
From the bytes per generated token, `speedup` models the memory-bound speed-up over AR: AR's bytes per
token divided by the mode's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from twotower.towers.moe import Experts, TopkRouter

BYTES = 2  # per element: bf16


@dataclass
class TowerTally:
    forwards: int = 0
    moe_calls: int = 0  # MoE layer calls (forwards x MoE layers)
    experts: int = 0  # distinct routed experts, summed over MoE layer calls
    bytes: int = 0

    @property
    def experts_per_layer(self) -> float:
        """Mean distinct experts touched per MoE layer per forward."""
        return self.experts / self.moe_calls if self.moe_calls else float("nan")


@dataclass
class Cost:
    tokens: int = 0  # generated tokens
    towers: dict[str, TowerTally] = field(default_factory=lambda: {"context": TowerTally(), "denoiser": TowerTally()})

    @property
    def bytes(self) -> int:
        return sum(t.bytes for t in self.towers.values())

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / self.tokens if self.tokens else float("nan")

    def add(self, other: Cost) -> None:
        self.tokens += other.tokens
        for name, t in other.towers.items():
            mine = self.towers[name]
            mine.forwards += t.forwards
            mine.moe_calls += t.moe_calls
            mine.experts += t.experts
            mine.bytes += t.bytes


def speedup(cost: Cost, ar: Cost) -> float:
    """Modelled memory-bound speed-up over AR: AR's bytes per generated token / this mode's."""
    return ar.bytes_per_token / cost.bytes_per_token if cost.tokens else float("nan")


class TowerBytes:
    """The byte formula of one tower's forward (see the module docstring)."""

    def __init__(self, tower: nn.Module) -> None:
        cfg = tower.cfg
        self.hidden = cfg.hidden_size
        expert_ids = {id(p) for m in tower.modules() if isinstance(m, Experts) for p in m.parameters()}
        embed = tower.model.embeddings.weight
        self.dense = sum(p.numel() for p in tower.parameters() if id(p) not in expert_ids and p is not embed)
        self.expert = cfg.moe_intermediate_size * cfg.hidden_size * 2  # up [i, d] + down [d, i]
        self.kv_per_position = len(cfg.layer_indices("*")) * 2 * cfg.num_key_value_heads * cfg.head_dim
        conv = cfg.conv_dim * (cfg.conv_kernel - 1)
        ssm = cfg.mamba_num_heads * cfg.mamba_head_dim * cfg.ssm_state_size
        self.mamba_state = len(cfg.layer_indices("M")) * (conv + ssm)

    def forward(self, tokens: int, context: int, experts: int, writes_state: bool) -> int:
        """Elements read by a forward over `tokens` new positions after `context` positions, touching
        `experts` distinct experts over all its MoE layers, in bytes."""
        state = self.mamba_state * (2 if writes_state else 1)
        kv = self.kv_per_position * (context + tokens)
        return BYTES * (self.dense + tokens * self.hidden + experts * self.expert + kv + state)

    def rewind(self) -> int:
        """The lossless rewind step: Mamba states only, read and written (no weights)."""
        return BYTES * 2 * self.mamba_state


class CostMeter:
    """Counts the cost of the generation forwards run through an InProcessExecutor, at batch 1:

    with CostMeter(engine.ex) as meter:
        reqs = engine.generate([prompt], params)
    cost = meter.cost(tokens=len(reqs[0].output_ids))
    """

    def __init__(self, executor) -> None:
        self.runners = {"context": executor.ctx}
        if executor.den is not None:
            self.runners["denoiser"] = executor.den
        self.formula = {name: TowerBytes(r.tower) for name, r in self.runners.items()}
        self._cost = Cost()
        self._prefill = False
        self._experts = 0  # distinct experts of the forward being run, over its MoE layers
        self._moe_calls = 0
        self._undo: list = []

    def _on_route(self, module, args, out) -> None:
        idx = out[0]  # [tokens, k]
        self._experts += int(idx.unique().numel())
        self._moe_calls += 1

    def _wrap_steps(self, name: str, runner) -> None:
        steps, run = runner.steps, runner.steps.run
        formula, table = self.formula[name], runner.table

        def counted(key, fn, *args, **kw):
            if len(table.lanes) != 1 or len(next(iter(table.lanes.values()))) != 1:
                raise RuntimeError("CostMeter counts batch-1 generation only (one lane, one row)")
            context = max(table.length)
            self._experts = self._moe_calls = 0
            out = run(key, fn, *args, **kw)
            if self._prefill:
                return out
            kind, tally = key[0], self._cost.towers[name]
            if kind == "rewind":
                tally.bytes += formula.rewind()
                return out
            tokens = 1 if kind in ("decode", "mock_ar") else int(key[3])
            tally.forwards += 1
            tally.moe_calls += self._moe_calls
            tally.experts += self._experts
            tally.bytes += formula.forward(tokens, context, self._experts, writes_state=name == "context")
            return out

        steps.run = counted  # an instance attribute over the class's method; __exit__ deletes it
        self._undo.append(lambda: delattr(steps, "run"))

    def __enter__(self) -> CostMeter:
        for name, runner in self.runners.items():
            self._wrap_steps(name, runner)
            for m in runner.tower.modules():
                if isinstance(m, TopkRouter):
                    self._undo.append(m.register_forward_hook(self._on_route).remove)
        ctx = self.runners["context"]
        prefill = ctx._prefill

        def flagged(*args, **kw):
            self._prefill = True
            try:
                return prefill(*args, **kw)
            finally:
                self._prefill = False

        ctx._prefill = flagged
        self._undo.append(lambda: delattr(ctx, "_prefill"))
        return self

    def __exit__(self, *exc) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()

    def cost(self, tokens: int) -> Cost:
        """The tally so far for `tokens` generated tokens; the meter starts afresh."""
        out, self._cost = self._cost, Cost()
        out.tokens = tokens
        return out
