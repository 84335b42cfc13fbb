"""Slow, explicit oracles for the tower tests, written from the spec text (model-spec 1.4, 2.2-2.4),
not from the code under test. They only *read* module weights. One sequence (batch row) at a time,
float64 throughout, plain loops where the maths is a loop (time steps, heads, experts of a token).

Per-row state layout used here (a plain dict per layer, one row):
    Mamba layer:     {"conv": [conv_dim, k] last k raw xBC columns, newest last, "ssm": [h, p, n]}
    attention layer: {"k": [T, kv_heads, head_dim], "v": [T, kv_heads, head_dim]}  (T = row's length)
    MoE / MLP:       None
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def f64(t: Tensor) -> Tensor:
    return t.detach().double()


def linear(x: Tensor, lin) -> Tensor:
    y = x @ f64(lin.weight).T
    return y if lin.bias is None else y + f64(lin.bias)


def silu(x: Tensor) -> Tensor:
    return x / (1.0 + torch.exp(-x))


def rmsnorm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x * 1/sqrt(mean(x^2) + eps) * weight over the last axis."""
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * f64(weight)


def relu2_mlp(x: Tensor, up: Tensor, down: Tensor) -> Tensor:
    """down(relu(up x)^2) with nn.Linear-oriented weights up [i, d], down [d, i]."""
    return (torch.clamp(x @ f64(up).T, min=0.0) ** 2) @ f64(down).T


# ---- timestep embedding (model-spec 2.2) -------------------------------------------------------------


def timestep_sinusoid(t: float) -> Tensor:
    """[cos(1000 t f_i) for i < 128] + [sin(1000 t f_i) for i < 128], f_i = 10000^(-i/128)."""
    cos = [math.cos(1000.0 * t * 10000.0 ** (-i / 128)) for i in range(128)]
    sin = [math.sin(1000.0 * t * 10000.0 ** (-i / 128)) for i in range(128)]
    return torch.tensor(cos + sin, dtype=torch.float64)


def time_embedding(den, t: float, sinusoid: Tensor | None = None) -> Tensor:
    """t_block(t_embedder(t)) -> [3, d]: rows shift, scale, gate before adding the layer's table.

    `sinusoid` replaces timestep_sinusoid(t): float32 arguments of up to 1000 rad are off by ~5e-5
    from the exact ones, which swamps a 1e-5 comparison of everything downstream, so tests of the whole
    denoiser pass the float32 sinusoid (itself checked against the formula above separately)."""
    mlp = den.t_embedder.mlp
    emb = timestep_sinusoid(t) if sinusoid is None else sinusoid.double()
    t_repr = linear(silu(linear(emb, mlp[0])), mlp[2])
    return linear(silu(t_repr), den.t_block[1]).view(3, -1)


# ---- router and MoE (model-spec 1.4 MoE) ---------------------------------------------------------------


def route(x: Tensor, gate, cfg) -> tuple[list[int], list[float]]:
    """One token x [d]: sigmoid scores, choice = s + bias, group-limited top-k on choice, weights from the
    unbiased scores, normalised (norm_topk_prob), times routed_scaling_factor. Returns (experts, weights)."""
    logits = [float(f64(gate.weight[e]) @ x.double()) for e in range(cfg.n_routed_experts)]
    s = [1.0 / (1.0 + math.exp(-v)) for v in logits]
    bias = f64(gate.e_score_correction_bias).tolist()
    choice = [s[e] + bias[e] for e in range(cfg.n_routed_experts)]
    per_group = cfg.n_routed_experts // cfg.n_group
    groups = [list(range(g * per_group, (g + 1) * per_group)) for g in range(cfg.n_group)]
    # a group's score is the sum of its two best choice values; keep the topk_group best groups
    group_score = [sum(sorted((choice[e] for e in grp), reverse=True)[:2]) for grp in groups]
    kept = sorted(range(cfg.n_group), key=lambda g: group_score[g], reverse=True)[: cfg.topk_group]
    candidates = [e for g in kept for e in groups[g]]
    chosen = sorted(candidates, key=lambda e: choice[e], reverse=True)[: cfg.num_experts_per_tok]
    w = [s[e] for e in chosen]
    if cfg.norm_topk_prob:
        total = sum(w) + 1e-20
        w = [v / total for v in w]
    return chosen, [v * cfg.routed_scaling_factor for v in w]


def moe(x: Tensor, mixer, cfg) -> Tensor:
    """x [l, d]: per token, sum_k w_k expert_k(x) + shared_expert(x)."""
    out = torch.zeros_like(x)
    for i in range(x.shape[0]):
        experts, weights = route(x[i], mixer.gate, cfg)
        for e, w in zip(experts, weights, strict=True):
            out[i] += w * relu2_mlp(x[i], mixer.experts.up_proj[e], mixer.experts.down_proj[e])
        if mixer.shared_experts is not None:
            sh = mixer.shared_experts
            out[i] += relu2_mlp(x[i], sh.up_proj.weight, sh.down_proj.weight)
    return out


# ---- Mamba-2 (model-spec 1.4 steps 1-8, 2.3 seeded block) ---------------------------------------------


def mamba(u: Tensor, mixer, cfg, conv_state: Tensor, ssm: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """u [l, d] from state (conv_state [conv_dim, k] raw columns, ssm [h, p, n]).
    Returns (out [l, d], new conv state, new ssm state)."""
    h, p, g, n = cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.n_groups, cfg.ssm_state_size
    d_inner, conv_dim, k = h * p, cfg.conv_dim, cfg.conv_kernel
    zxbcdt = linear(u, mixer.in_proj)
    z, xBC, dt_raw = zxbcdt[:, :d_inner], zxbcdt[:, d_inner : d_inner + conv_dim], zxbcdt[:, d_inner + conv_dim :]
    # causal depthwise conv over [last k-1 raw columns of the state | block]
    raw = torch.cat([f64(conv_state).T, xBC], dim=0)  # [k + l, conv_dim], rows are time
    weight, bias = f64(mixer.conv1d.weight)[:, 0, :], f64(mixer.conv1d.bias)  # [conv_dim, k]
    conv = torch.stack([bias + (raw[t + 1 : t + 1 + k].T * weight).sum(-1) for t in range(u.shape[0])])
    new_conv = raw[-k:].T.clone()
    act = silu(conv)
    xs = act[:, :d_inner].view(-1, h, p)
    Bs = act[:, d_inner : d_inner + g * n].view(-1, g, n)
    Cs = act[:, d_inner + g * n :].view(-1, g, n)
    dt = torch.nn.functional.softplus(dt_raw + f64(mixer.dt_bias))  # [l, h]; default limit (0, inf)
    A = -torch.exp(f64(mixer.A_log))
    D = f64(mixer.D)
    S = f64(ssm).clone()
    y = torch.zeros(u.shape[0], h, p, dtype=torch.float64)
    for t in range(u.shape[0]):
        for hh in range(h):
            gg = hh // (h // g)
            S[hh] = torch.exp(dt[t, hh] * A[hh]) * S[hh] + dt[t, hh] * torch.outer(xs[t, hh], Bs[t, gg])
            y[t, hh] = S[hh] @ Cs[t, gg] + D[hh] * xs[t, hh]
    # gated RMSNorm, gate before norm, per group of d_inner / n_groups channels
    gated = y.reshape(-1, d_inner) * silu(z)
    grp = gated.view(-1, g, d_inner // g)
    normed = grp / torch.sqrt((grp * grp).mean(-1, keepdim=True) + cfg.layer_norm_epsilon)
    out = linear(normed.reshape(-1, d_inner) * f64(mixer.norm.weight), mixer.out_proj)
    return out, new_conv, S


# ---- attention (model-spec 1.4 attention, 2.3 joint attention) ----------------------------------------


def attention(u: Tensor, mixer, cfg, k_ctx: Tensor, v_ctx: Tensor, causal: bool) -> tuple[Tensor, Tensor, Tensor]:
    """u [l, d]; keys = [context K (T rows) || the chunk's own K]. causal: chunk query i sees the context
    and chunk keys <= i; otherwise everything. Returns (out [l, d], new K, new V) with the chunk appended."""
    hq, hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    L, T = u.shape[0], k_ctx.shape[0]
    q = linear(u, mixer.q_proj).view(L, hq, hd)
    K = torch.cat([f64(k_ctx), linear(u, mixer.k_proj).view(L, hkv, hd)])
    V = torch.cat([f64(v_ctx), linear(u, mixer.v_proj).view(L, hkv, hd)])
    out = torch.zeros(L, hq, hd, dtype=torch.float64)
    for head in range(hq):
        kv = head // (hq // hkv)
        for i in range(L):
            visible = T + i + 1 if causal else T + L
            scores = (K[:visible, kv] @ q[i, head]) / math.sqrt(hd)
            probs = torch.exp(scores - scores.max())
            out[i, head] = (probs / probs.sum()) @ V[:visible, kv]
    return linear(out.reshape(L, hq * hd), mixer.o_proj), K, V


# ---- the whole stack, one row -------------------------------------------------------------------------


def row_state(state, r: int) -> list[dict | None]:
    """Row r of a ContextState as per-layer dicts (KV cut to the row's length)."""
    n = int(state.lengths[r])
    out = []
    for s in state.layers:
        if s is None:
            out.append(None)
        elif hasattr(s, "ssm"):
            out.append({"conv": s.conv[r], "ssm": s.ssm[r]})
        else:
            out.append({"k": s.k[r, :n], "v": s.v[r, :n]})
    return out


def stack(
    model,
    ids: Tensor,
    layers: list[dict | None],
    causal: bool,
    temb: Tensor | None = None,
    tables=None,
    swap_norm_order: bool = False,
) -> tuple[Tensor, list[dict | None]]:
    """One row through a Backbone: ids [l] -> (final-normed hidden [l, d], per-layer state after ids).

    temb [3, d] with tables[i] [3, d] turns on adaLN: (shift, scale, gate) = tables[i] + temb;
    Mamba / attention layers modulate then norm, MoE / MLP layers norm then modulate (`swap_norm_order`
    flips that, to show the test can tell the two apart); h += gate * mixer(u)."""
    cfg = model.cfg
    eps = cfg.layer_norm_epsilon
    h = f64(model.embeddings.weight)[ids]
    new_layers = []
    for i, block in enumerate(model.layers):
        kind, st = block.kind, layers[i]
        if temb is not None:
            shift, scale, gate = f64(tables[i]) + temb
            modulate_first = (kind in "M*") != swap_norm_order
            if modulate_first:
                u = rmsnorm(h * (1 + scale) + shift, block.norm.weight, eps)
            else:
                u = rmsnorm(h, block.norm.weight, eps) * (1 + scale) + shift
        else:
            gate = 1.0
            u = rmsnorm(h, block.norm.weight, eps)
        if kind == "M":
            y, conv, ssm = mamba(u, block.mixer, cfg, st["conv"], st["ssm"])
            new_layers.append({"conv": conv, "ssm": ssm})
        elif kind == "*":
            y, K, V = attention(u, block.mixer, cfg, st["k"], st["v"], causal)
            new_layers.append({"k": K, "v": V})
        elif kind == "E":
            y = moe(u, block.mixer, cfg)
            new_layers.append(None)
        else:
            y = relu2_mlp(u, block.mixer.up_proj.weight, block.mixer.down_proj.weight)
            new_layers.append(None)
        h = h + gate * y
    return rmsnorm(h, model.norm_f.weight, eps), new_layers


def denoise(
    den, xt: Tensor, t: float, layers: list[dict | None], swap_norm_order: bool = False, sinusoid: Tensor | None = None
) -> Tensor:
    """DenoiserTower.denoise for one row: xt [S] -> x0 logits [S, vocab] (model-spec 2.3)."""
    temb = time_embedding(den, t, sinusoid)
    hidden, _ = stack(
        den.model, xt, layers, causal=False, temb=temb, tables=den.scale_shift_tables, swap_norm_order=swap_norm_order
    )
    return linear(hidden, den.lm_head)


def mock_ar(den, last: int, layers: list[dict | None]) -> Tensor:
    """Mock-AR for one row: the denoiser stack, no modulation, one token, causal -> logits [vocab]."""
    hidden, _ = stack(den.model, torch.tensor([last]), layers, causal=True)
    return linear(hidden[0], den.lm_head)
