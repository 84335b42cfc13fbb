"""The unmasking rule of block diffusion (cluster.unmask) on synthetic confidences and logits.

The rule (model-spec §2.5, "Mask-diffusion loop"), per row with n masked positions at step s of T:
k = #(masked with conf strictly > gamma), at least 1, at least ceil(n / (T - s)), at most n, and n at the
last step; the k most confident masked positions are committed (ties: lower position first).
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from twotower.decoding.unmask import commit_counts, gumbel_noise, select_commits, x0_predict

MASK = 3


def rule_k(masked: list[bool], conf: list[float], step: int, steps: int, gamma: float) -> int:
    """The spec's commit count for one row, in plain Python."""
    n = sum(masked)
    if step >= steps - 1:
        return n
    above = sum(1 for m, c in zip(masked, conf, strict=True) if m and c > gamma)
    k = above if above > 0 else 1
    return min(max(k, math.ceil(n / (steps - step))), n)


def rule_select(masked: list[bool], conf: list[float], step: int, steps: int, gamma: float) -> list[bool]:
    """The k most confident masked positions; equal confidences go to the lower position."""
    k = rule_k(masked, conf, step, steps, gamma)
    order = sorted((j for j, m in enumerate(masked) if m), key=lambda j: (-conf[j], j))
    chosen = set(order[:k])
    return [j in chosen for j in range(len(masked))]


def one_row(masked, conf, step, steps, gamma):
    """select_commits / commit_counts on a single row given as Python lists."""
    m = torch.tensor([masked])
    c = torch.tensor([conf], dtype=torch.float32)
    args = (m, c, torch.tensor([step]), torch.tensor([steps]), torch.tensor([gamma], dtype=torch.float32))
    return select_commits(*args)[0].tolist(), int(commit_counts(*args)[0])


# ---- ties and thresholds ---------------------------------------------------------------------------------


def test_ties_go_to_lower_positions_deterministically():
    masked = [True] * 8
    conf = [0.1] * 8  # all equal, none above gamma; floor ceil(8/4) = 2
    for _ in range(3):
        sel, k = one_row(masked, conf, 0, 4, 0.8)
        assert k == 2
        assert sel == [True, True] + [False] * 6
    # a tie at the boundary of the k chosen: the lower positions among the tied ones win
    conf = [0.05, 0.3, 0.2, 0.3, 0.3, 0.01]
    sel, k = one_row([True] * 6, conf, 0, 3, 0.9)  # floor ceil(6/3) = 2
    assert k == 2
    assert sel == [False, True, False, True, False, False]
    # ties among positions after some are already committed
    sel, _ = one_row([False, True, True, False, True, True], [1.0, 0.2, 0.2, 1.0, 0.2, 0.2], 0, 4, 0.5)
    assert sel == [False, True, False, False, False, False]


def test_confidence_equal_to_gamma_is_not_above():
    # two positions at exactly gamma, one above: only the one above counts (k = 1 beyond the floor)
    sel, k = one_row([True] * 4, [0.5, 0.5, 0.75, 0.25], 0, 16, 0.5)
    assert k == 1
    assert sel == [False, False, True, False]
    # float32 exactness: gamma given as a float32 tensor equal to conf
    g = 0.3
    c = torch.tensor([[g, g, g]], dtype=torch.float32)
    gamma = torch.tensor([g], dtype=torch.float32)
    k = commit_counts(torch.ones(1, 3, dtype=torch.bool), c, torch.tensor([0]), torch.tensor([8]), gamma)
    assert int(k[0]) == 1
    # just above gamma does count
    c2 = torch.nextafter(c, torch.ones_like(c))
    k = commit_counts(torch.ones(1, 3, dtype=torch.bool), c2, torch.tensor([0]), torch.tensor([8]), gamma)
    assert int(k[0]) == 3


def test_gamma_one_commits_only_the_floor():
    # confidences of exactly 1.0 are not above gamma = 1.0: only the schedule floor is committed
    for n, steps in [(8, 8), (8, 4), (8, 3), (5, 16)]:
        for step in range(steps - 1):
            remaining_masked = n  # all masked at every step of this synthetic check
            sel, k = one_row([True] * n, [1.0] * n, step, steps, 1.0)
            expect = min(max(1, math.ceil(remaining_masked / (steps - step))), n)
            assert k == expect, (n, steps, step)
            assert sel == [j < expect for j in range(n)]
    # a full block with gamma = 1: exactly ceil-schedule steps
    masked = [True] * 16
    steps_taken = 0
    for step in range(16):
        if not any(masked):
            break
        sel, _ = one_row(masked, [1.0] * 16, step, 16, 1.0)
        masked = [m and not s for m, s in zip(masked, sel, strict=True)]
        steps_taken += 1
    assert steps_taken == 16


def test_last_step_commits_everything():
    masked = [True, False, True, True, True, False, True, True]
    conf = [0.01] * 8
    for steps in (1, 2, 16):
        sel, k = one_row(masked, conf, steps - 1, steps, 0.99)
        assert k == sum(masked)
        assert sel == masked
    # a step index past the end (defensive) also commits everything
    sel, _ = one_row(masked, conf, 20, 16, 0.99)
    assert sel == masked


def test_at_least_one_per_step():
    # nothing above gamma and a floor of 1 (many steps left): exactly the single most confident
    sel, k = one_row([True] * 6, [0.1, 0.2, 0.05, 0.3, 0.29, 0.0], 0, 64, 0.9)
    assert k == 1
    assert sel == [False, False, False, True, False, False]
    # confidences of zero still commit one
    sel, k = one_row([True] * 4, [0.0] * 4, 2, 64, 0.5)
    assert k == 1 and sel == [True, False, False, False]


def test_schedule_floor():
    # none above gamma: k == ceil(n / (T - s))
    cases = [(16, 16, 0, 1), (16, 4, 0, 4), (15, 4, 1, 5), (7, 3, 1, 4), (3, 16, 14, 2), (10, 4, 0, 3)]
    for n, steps, step, expect in cases:
        sel, k = one_row([True] * n, [0.0] * n, step, steps, 0.5)
        assert k == expect == math.ceil(n / (steps - step)), (n, steps, step)
        assert sum(sel) == expect
    # above gamma beats the floor when larger; the floor wins when larger
    sel, k = one_row([True] * 8, [0.9] * 5 + [0.1] * 3, 0, 8, 0.5)
    assert k == 5
    sel, k = one_row([True] * 8, [0.9] * 2 + [0.1] * 3 + [0.2] * 3, 0, 2, 0.5)
    assert k == 4  # ceil(8 / 2)
    assert sel == [True, True, False, False, False, True, True, False]


def test_random_rows_match_the_plain_rule():
    rng = random.Random(0)
    for _ in range(300):
        S = rng.randint(1, 12)
        steps = rng.randint(1, 10)
        step = rng.randint(0, steps - 1)
        masked = [rng.random() < 0.7 for _ in range(S)]
        if not any(masked):
            masked[rng.randrange(S)] = True
        # coarse values so that ties and exact-gamma cases are frequent
        conf = [rng.choice([0.0, 0.25, 0.5, 0.75, 1.0]) for _ in range(S)]
        gamma = rng.choice([0.25, 0.5, 0.75, 1.0])
        sel, k = one_row(masked, conf, step, steps, gamma)
        assert k == rule_k(masked, conf, step, steps, gamma)
        assert sel == rule_select(masked, conf, step, steps, gamma), (masked, conf, step, steps, gamma)


def test_committed_positions_are_never_selected_or_remasked():
    # committed positions carry high confidence (the reference sets +inf there): never chosen, never counted
    masked = torch.tensor([[False, True, False, True, True, False]])
    conf = torch.tensor([[float("inf"), 0.1, 0.99, 0.2, 0.3, 1.0]])
    one = torch.ones(1, dtype=torch.long)
    sel = select_commits(masked, conf, 0 * one, 16 * one, torch.tensor([0.5]))
    assert not bool((sel & ~masked).any())
    assert sel.tolist() == [[False, False, False, False, True, False]]  # nothing masked is above 0.5
    # a whole block driven by random confidences: every position committed exactly once, within T steps
    g = torch.Generator().manual_seed(0)
    for steps in (1, 3, 8, 16):
        b, S = 5, 16
        xt = torch.full((b, S), MASK)
        committed_at = torch.full((b, S), -1)
        gamma = torch.tensor([0.2, 0.5, 0.9, 1.0, 0.05])
        for step in range(steps):
            masked = xt == MASK
            if not bool(masked.any()):
                break
            conf = torch.rand(b, S, generator=g)
            pred = torch.randint(4, 260, (b, S), generator=g)
            sel = select_commits(masked, conf, torch.full((b,), step), torch.full((b,), steps), gamma)
            assert not bool((sel & ~masked).any())
            assert bool((sel.sum(-1) >= masked.any(-1).long()).all())  # >= 1 per row with masks left
            before = xt.clone()
            xt = torch.where(sel, pred, xt)
            assert bool((xt[~masked] == before[~masked]).all())  # committed tokens unchanged
            committed_at[sel] = step
        assert not bool((xt == MASK).any())
        assert bool((committed_at >= 0).all())


def test_per_row_parameters_in_one_batch_equal_each_row_alone():
    g = torch.Generator().manual_seed(1)
    b, S = 6, 10
    masked = torch.rand(b, S, generator=g) < 0.8
    masked[:, 0] = True
    conf = torch.rand(b, S, generator=g)
    conf[2, :] = 0.5  # a row of ties
    step = torch.tensor([0, 1, 3, 7, 0, 2])
    steps = torch.tensor([16, 4, 4, 8, 1, 3])
    gamma = torch.tensor([0.5, 0.9, 0.5, 0.1, 0.3, 1.0])
    batch_sel = select_commits(masked, conf, step, steps, gamma)
    batch_k = commit_counts(masked, conf, step, steps, gamma)
    for r in range(b):
        sl = slice(r, r + 1)
        alone = select_commits(masked[sl], conf[sl], step[sl], steps[sl], gamma[sl])
        assert torch.equal(batch_sel[sl], alone), r
        assert int(batch_k[r]) == int(commit_counts(masked[sl], conf[sl], step[sl], steps[sl], gamma[sl])[0])
        assert batch_sel[r].tolist() == rule_select(
            masked[r].tolist(), conf[r].tolist(), int(step[r]), int(steps[r]), float(gamma[r])
        )


# ---- x0 prediction -------------------------------------------------------------------------------------


def _logits(b=3, S=5, V=12, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, S, V, generator=g) * scale


def test_mask_token_is_never_predicted():
    logits = _logits()
    logits[..., MASK] = 100.0  # the mask token is by far the most likely
    for temp in (0.0, 0.5, 5.0):
        t = torch.full((3,), temp)
        for seed in range(10):
            pred, conf = x0_predict(logits, MASK, t, [seed, seed + 1, seed + 2])
            assert not bool((pred == MASK).any())
            assert bool((conf > 0).all())
    # and the confidence is renormalised without the mask column
    pred, conf = x0_predict(logits, MASK, torch.zeros(3))
    no_mask = logits.clone()
    no_mask[..., MASK] = float("-inf")
    torch.testing.assert_close(conf, no_mask.softmax(-1).max(-1).values)


def test_greedy_is_argmax_with_untempered_confidence():
    logits = _logits()
    pred, conf = x0_predict(logits, MASK, torch.zeros(3))
    ref = logits.clone()
    ref[..., MASK] = float("-inf")
    assert torch.equal(pred, ref.argmax(-1))
    torch.testing.assert_close(conf, ref.softmax(-1).gather(-1, pred[..., None])[..., 0])
    # x0_predict does not modify its input
    again = _logits()
    x0_predict(again, MASK, torch.zeros(3))
    assert torch.equal(again, _logits())


def test_sampling_needs_seeds():
    with pytest.raises(ValueError, match="seeds"):
        x0_predict(_logits(), MASK, torch.tensor([0.0, 1.0, 0.0]))


def test_temperature_sampling_is_seeded_per_row_and_confidence_is_untempered():
    logits = _logits(b=3, S=6, V=16, scale=1.0)
    temps = torch.tensor([0.7, 0.0, 1.5])
    p1, c1 = x0_predict(logits, MASK, temps, [11, 12, 13])
    p2, c2 = x0_predict(logits, MASK, temps, [11, 99, 13])  # the greedy row's seed is irrelevant
    assert torch.equal(p1, p2) and torch.equal(c1, c2)
    # the greedy row is the argmax
    ref = logits.clone()
    ref[..., MASK] = float("-inf")
    assert torch.equal(p1[1], ref[1].argmax(-1))
    # confidence = untempered probability of the sampled token (not the tempered one)
    probs = ref.softmax(-1)
    torch.testing.assert_close(c1, probs.gather(-1, p1[..., None])[..., 0])
    # a row alone with its seed samples the same as inside the batch
    for r, seed in [(0, 11), (2, 13)]:
        pa, ca = x0_predict(logits[r : r + 1], MASK, temps[r : r + 1], [seed])
        assert torch.equal(pa[0], p1[r]) and torch.equal(ca[0], c1[r])
    # different seeds give different samples somewhere (16 positions x several seeds)
    samples = {tuple(x0_predict(logits, MASK, temps, [s, 0, s])[0].flatten().tolist()) for s in range(8)}
    assert len(samples) > 1


def test_gumbel_sampling_follows_the_tempered_distribution():
    # one position, 4 tokens (plus the mask column); many seeds: frequencies ~ softmax(logits / T)
    base = torch.tensor([1.0, 0.0, -1.0, -9.0, 0.5])  # index 3 is the mask token
    n = 3000
    for temp in (0.5, 2.0):
        logits = base.expand(n, 1, 5).clone()
        pred, conf = x0_predict(logits, MASK, torch.full((n,), temp), list(range(n)))
        assert not bool((pred == MASK).any())
        freq = torch.bincount(pred.flatten(), minlength=5).float() / n
        ref = base.clone()
        ref[MASK] = float("-inf")
        want = (ref / temp).softmax(-1)
        assert float((freq - want).abs().max()) < 0.04, (temp, freq, want)
        # confidence is the untempered probability whatever the temperature
        torch.testing.assert_close(conf[:, 0], ref.softmax(-1)[pred[:, 0]])


def test_gumbel_noise_rows_depend_only_on_their_seed():
    a = gumbel_noise((3, 4, 7), [5, 6, 7], torch.device("cpu"))
    b = gumbel_noise((1, 4, 7), [6], torch.device("cpu"))
    assert torch.equal(a[1], b[0])
    assert not torch.equal(a[0], a[1])
    assert bool(torch.isfinite(a).all())
