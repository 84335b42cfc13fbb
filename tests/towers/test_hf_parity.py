"""Parity of our context tower with transformers' native `NemotronHForCausalLM` (5.25, pure-PyTorch path).

For each small random config (fp32, hidden 64, every layer kind M * E -, one config with group-limited
routing n_group=2 / topk_group=1) transformers builds the model, every parameter and buffer is
overwritten with seeded realistic values (tests/towers/hf_reference.py), `save_pretrained` writes the
checkpoint in the NVIDIA on-disk layout (`backbone.*`, one tensor pair per expert) and our
`load_tower` reads it back. Then, batch 2, tolerance 1e-4 on fp32 logits:

- prefill: `ContextTower.forward` on a fresh state + `logits` at every position vs transformers'
  no-cache forward, lengths 1..128 (chunk_size 16 or 8, so up to 16 SSD chunks);
- right-padded prefill (`n_valid`) vs transformers row by row, then decoding on from the padded state;
- block extension: prefill + `forward` on 16-token blocks vs the no-cache forward of the whole sequence;
- cached decode: prefill of a prefix + 16 single-token `decode` steps vs transformers with its cache
  (`use_cache=True`, then `cache=out.cache`; `past_key_values=` is a deprecated alias).

Findings about the reference, transformers 5.25.0 (see docs/parity.md):

- Inter-chunk SSM recurrence: correct since 5.24.0 (the wrong-axis reduction reported for 5.6-5.13 is
  gone). `test_reference_is_self_consistent` checks it: its no-cache forward over 128 tokens (8 or 16
  chunks) equals its own token-by-token cached decode (which never chunks) to ~5e-6, while dropping
  the SSM state at the first chunk boundary would move logits by >1e-2. So prefill up to 128 tokens,
  past chunk_size, is a valid comparison here.
- dt clamp: since 5.25 transformers clamps dt only to `config.time_step_limit` (default (0, inf)) on
  both paths, as the CUDA kernels and our tower do; 5.24 clamped its chunked path (any multi-token
  forward, and the first cached token) at time_step_min (1e-3), so it disagreed with its own decode
  whenever dt < 1e-3. The random weights keep dt above 2 * time_step_min anyway (asserted; measured
  minimum 7e-3). `test_dt_below_time_step_min_is_not_clamped` compares at dt = 1e-4, where a clamp
  on either side would show.
- The Mamba gated RMSNorm casts to the input dtype before multiplying the weight (the block RMSNorm
  multiplies in fp32 first); identical in fp32, a bf16 rounding difference only.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers", reason="transformers (the parity reference) is not installed")

from twotower.towers.checkpoint import load_tower  # noqa: E402
from twotower.towers.context import ContextTower  # noqa: E402
from twotower.towers.mamba2 import Mamba2Mixer  # noqa: E402
from twotower.towers.state import MambaState  # noqa: E402

from .hf_reference import build_hf_model, hf_min_prefill_dt  # noqa: E402

TOL = 1e-4
BATCH = 2
# Largest |diff| seen per check (printed at the end of the module with `pytest -s`; see docs/parity.md).
MEASURED: dict[str, float] = {}

CONFIGS = {
    "M*EM-E": dict(pattern="M*EM-E", seed=101, overrides={}),
    "MEM*E-M*E-grouped": dict(
        pattern="MEM*E-M*E",
        seed=202,
        overrides=dict(
            n_group=2,
            topk_group=1,
            chunk_size=8,
            conv_kernel=3,
            mamba_num_heads=16,
            mamba_head_dim=8,
            n_groups=4,
            ssm_state_size=8,
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=8,
            moe_intermediate_size=24,
            moe_shared_expert_intermediate_size=48,
            intermediate_size=40,
        ),  # fmt: skip
    ),
}


def _load_ours(path) -> ContextTower:
    tower = load_tower(path, role="context", device="cpu", dtype=torch.float32).eval()
    assert isinstance(tower, ContextTower)
    return tower


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    if MEASURED:
        print(f"\nmax |logit diff| (parity checks: <= {TOL:.0e}; power checks: must exceed the bound shown):")
        for key, v in MEASURED.items():
            print(f"  {key:72s} {v:.2e}")


@pytest.fixture(scope="module", params=list(CONFIGS), ids=list(CONFIGS))
def pair(request, tmp_path_factory):
    """(config name, transformers model, our tower loaded from its save_pretrained, seed)."""
    spec = CONFIGS[request.param]
    hf = build_hf_model(spec["pattern"], spec["seed"], **spec["overrides"])
    path = tmp_path_factory.mktemp(f"hf_{spec['seed']}")
    hf.save_pretrained(path)
    ours = _load_ours(path)
    assert ours.cfg.pattern == spec["pattern"]
    return request.param, hf, ours, spec["seed"]


def _ids(seed: int, *shape: int) -> torch.Tensor:
    return torch.randint(3, 256, shape, generator=torch.Generator().manual_seed(seed))


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def _close(key: str, got: torch.Tensor, ref: torch.Tensor) -> None:
    d = _maxdiff(got, ref)
    MEASURED[key] = max(MEASURED.get(key, 0.0), d)
    assert d <= TOL, f"{key}: max |diff| {d:.3e} > {TOL:.0e}"


def _differs(key: str, a: torch.Tensor, b: torch.Tensor, floor: float) -> None:
    """A power check: the two must differ by more than `floor`."""
    d = _maxdiff(a, b)
    key = f"{key} (> {floor:.0e})"
    MEASURED[key] = min(MEASURED.get(key, float("inf")), d)
    assert d > floor, f"{key}: max |diff| only {d:.3e}"


@torch.no_grad()
def test_reference_is_self_consistent(pair):
    """transformers' chunked no-cache forward == its own token-by-token cached decode (no chunking), and
    the comparison has power: the SSM state carried over the first chunk boundary matters."""
    name, hf, ours, seed = pair
    n = 128
    ids = _ids(seed + 1, BATCH, n)
    assert hf_min_prefill_dt(hf, ids) > 2 * hf.config.time_step_min  # the prefill dt clamp never bites
    full = hf(ids).logits
    out = hf(ids[:, :1], use_cache=True)
    steps = [out.logits[:, -1]]
    for i in range(1, n):
        out = hf(ids[:, i : i + 1], cache=out.cache, use_cache=True)
        steps.append(out.logits[:, -1])
    _close(f"{name}: transformers chunked forward vs its own decode, 128", torch.stack(steps, 1), full)

    # Power: restart every Mamba layer's SSM state at the first chunk boundary (ours, same weights).
    cs = ours.cfg.chunk_size
    state = ours.new_state(BATCH, n)
    ours(ids[:, :cs], state)
    for layer in state.layers:
        if isinstance(layer, MambaState):
            layer.ssm.zero_()
    dropped = ours.logits(ours(ids[:, cs:], state))
    _differs(f"{name}: power: SSM state dropped at the first chunk boundary", dropped, full[:, cs:], 1e-2)


@torch.no_grad()
@pytest.mark.parametrize("n", [1, 7, 16, 17, 45, 128])
def test_prefill_logits(pair, n):
    name, hf, ours, seed = pair
    ids = _ids(seed + 2 + n, BATCH, n)
    ref = hf(ids).logits
    state = ours.new_state(BATCH, n)
    got = ours.logits(ours(ids, state))
    assert state.lengths.tolist() == [n] * BATCH
    _close(f"{name}: prefill, all positions, len 1..128", got, ref)


@torch.no_grad()
def test_right_padded_prefill_then_decode(pair):
    """Rows of different lengths in one right-padded prefill (n_valid), then decoding on; transformers
    runs each row alone."""
    name, hf, ours, seed = pair
    lens = [128, 53]
    ids = _ids(seed + 3, BATCH, max(lens))
    steps = 8
    nxt = _ids(seed + 4, BATCH, steps)
    state = ours.new_state(BATCH, 256)
    hidden = ours(ids, state, n_valid=torch.tensor(lens))
    assert state.lengths.tolist() == lens
    got_steps = [ours.decode(nxt[:, t], state) for t in range(steps)]
    for r, n in enumerate(lens):
        out = hf(ids[r : r + 1, :n], use_cache=True)
        _close(f"{name}: right-padded prefill (n_valid 128, 53)", ours.logits(hidden[r, :n]), out.logits[0])
        for t in range(steps):
            out = hf(nxt[r : r + 1, t : t + 1], cache=out.cache, use_cache=True)
            _close(f"{name}: decode after right-padded prefill, 8 steps", got_steps[t][r], out.logits[0, -1])


@torch.no_grad()
def test_block_extension(pair):
    """Prefill 20 tokens, then extend by committed 16-token blocks (the context tower's block path)."""
    name, hf, ours, seed = pair
    prefix, block, nblocks = 20, 16, 4
    ids = _ids(seed + 5, BATCH, prefix + block * nblocks)
    ref = hf(ids).logits
    state = ours.new_state(BATCH, 16)  # small on purpose: the KV cache grows
    got = [ours.logits(ours(ids[:, :prefix], state))]
    for b in range(nblocks):
        s = prefix + b * block
        got.append(ours.logits(ours(ids[:, s : s + block], state)))
    _close(f"{name}: prefill 20 + 4 blocks of 16", torch.cat(got, 1), ref)


def _set_dt_limit(tower: ContextTower, limit: tuple[float, float]) -> None:
    for mod in tower.modules():
        if isinstance(mod, Mamba2Mixer):
            mod.cfg = mod.cfg.replace(time_step_limit=limit)


@torch.no_grad()
def test_dt_below_time_step_min_is_not_clamped(tmp_path):
    """With dt = 1e-4 < time_step_min (1e-3), transformers (>= 5.25) clamps dt on neither its chunked nor
    its single-token path, as the CUDA kernels with the default time_step_limit (0, inf); ours equals
    both. transformers 5.24 clamped the chunked path only, so its prefill and decode disagreed. Clamping
    ours at time_step_min moves the logits by far more than the parity bound: the input exercises the
    clamp, so the equalities above would catch one coming back on either side."""
    spec = CONFIGS["M*EM-E"]
    hf = build_hf_model(spec["pattern"], spec["seed"], **spec["overrides"])
    tiny_dt, t_min = 1e-4, hf.config.time_step_min
    for mod in hf.modules():
        if type(mod).__name__ == "NemotronHMamba2Mixer":
            mod.dt_bias.fill_(tiny_dt + torch.log(-torch.expm1(torch.tensor(-tiny_dt))).item())
            mod.in_proj.weight[-mod.num_heads :] = 0.0  # dt = softplus(dt_bias) = 1e-4 for every token
    hf.save_pretrained(tmp_path)
    ours = _load_ours(tmp_path)
    n = 40
    ids = _ids(7, BATCH, n)
    hf_prefill = hf(ids).logits
    out = hf(ids[:, :1], use_cache=True)  # chunked path
    hf_steps = [out.logits[:, -1]]
    for i in range(1, n):
        out = hf(ids[:, i : i + 1], cache=out.cache, use_cache=True)  # recurrent path
        hf_steps.append(out.logits[:, -1])
    hf_steps = torch.stack(hf_steps, 1)

    assert ours.cfg.time_step_limit == (0.0, float("inf"))
    unclamped = ours.logits(ours(ids, ours.new_state(BATCH, n)))
    _close("dt=1e-4: ours vs transformers prefill", unclamped, hf_prefill)
    state = ours.new_state(BATCH, n)
    steps = [ours.logits(ours(ids[:, :1], state))[:, -1]] + [ours.decode(ids[:, i], state) for i in range(1, n)]
    _close("dt=1e-4: ours decode vs transformers decode", torch.stack(steps, 1), hf_steps)

    _set_dt_limit(ours, (t_min, float("inf")))
    clamped = ours.logits(ours(ids, ours.new_state(BATCH, n)))
    _differs("dt=1e-4: ours clamped at time_step_min vs transformers prefill", clamped, hf_prefill, 1e-3)


@torch.no_grad()
def test_cached_decode(pair):
    name, hf, ours, seed = pair
    prefix, steps = 37, 16
    ids = _ids(seed + 6, BATCH, prefix + steps)
    out = hf(ids[:, :prefix], use_cache=True)
    state, last = ours.prefill(ids[:, :prefix])
    _close(f"{name}: prefill 37, last-token logits", last, out.logits[:, -1])
    for t in range(prefix, prefix + steps):
        out = hf(ids[:, t : t + 1], cache=out.cache, use_cache=True)
        _close(f"{name}: cached decode, 16 steps after prefill 37", ours.decode(ids[:, t], state), out.logits[:, -1])
    assert state.lengths.tolist() == [prefix + steps] * BATCH
