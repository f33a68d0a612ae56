"""Paired preference losses against values worked out from each paper's formula.

The expected numbers are computed here with `math` on plain floats, row by row, never by
calling the code under test. Two fixed rows:
    row 0: πc=-3.0, πr=-4.0, rc=-3.5, rr=-3.8, |yc|=4, |yr|=5  -> log-ratios +0.5, -0.2, h = 0.7
    row 1: πc=-10., πr=-6.0, rc=-9.0, rr=-7.0, |yc|=8, |yr|=2  -> log-ratios -1.0, +1.0, h = -2.0
"""

import math

import pytest
import torch

from soup.errors import ConfigError
from soup.losses import preference as P
from soup.losses.preference import PairedLogps
from soup.losses.registry import LOSSES

ROWS = [
    dict(pc=-3.0, pr=-4.0, rc=-3.5, rr=-3.8, nc=4, nr=5),
    dict(pc=-10.0, pr=-6.0, rc=-9.0, rr=-7.0, nc=8, nr=2),
]


def make_batch(rows=ROWS, dtype=torch.float64, requires_grad=False, reference=True) -> PairedLogps:
    def t(key):
        return torch.tensor([r[key] for r in rows], dtype=dtype)

    chosen, rejected = t("pc"), t("pr")
    chosen.requires_grad_(requires_grad)
    rejected.requires_grad_(requires_grad)
    return PairedLogps(chosen=chosen, rejected=rejected,
                       chosen_tokens=torch.tensor([r["nc"] for r in rows]),
                       rejected_tokens=torch.tensor([r["nr"] for r in rows]),
                       ref_chosen=t("rc") if reference else None,
                       ref_rejected=t("rr") if reference else None)


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def h(r) -> float:
    return (r["pc"] - r["rc"]) - (r["pr"] - r["rr"])


def assert_values(actual: torch.Tensor, expected: list[float], tol: float = 1e-10):
    assert actual.shape == (len(expected),)
    for a, e in zip(actual.tolist(), expected):
        assert a == pytest.approx(e, rel=tol, abs=tol), (actual.tolist(), expected)


# ----------------------------------------------------------------------------- hand-computed values


def test_row_log_ratios_are_what_the_module_docstring_says():
    assert [h(r) for r in ROWS] == pytest.approx([0.7, -2.0])


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_sigmoid_matches_hand_computed_value(eps):
    beta = 0.1
    out = P.dpo_sigmoid(make_batch(), beta=beta, label_smoothing=eps)
    expected = [-(1 - eps) * logsig(beta * h(r)) - eps * logsig(-beta * h(r)) for r in ROWS]
    assert_values(out.losses, expected)
    # row 0 by hand: βh = 0.07
    if eps == 0:
        assert out.losses[0].item() == pytest.approx(math.log(1 + math.exp(-0.07)), rel=1e-12)
    assert_values(out.chosen_rewards, [0.1 * 0.5, 0.1 * -1.0])
    assert_values(out.rejected_rewards, [0.1 * -0.2, 0.1 * 1.0])


@pytest.mark.parametrize("beta", [0.1, 2.0])
def test_hinge_matches_hand_computed_value(beta):
    out = P.dpo_hinge(make_batch(), beta=beta)
    expected = [max(0.0, 1 - beta * h(r)) for r in ROWS]
    assert_values(out.losses, expected)
    if beta == 2.0:
        assert out.losses[0].item() == 0.0  # margin 1.4 > 1: no loss, no gradient


def test_ipo_averages_log_probs_over_tokens_before_the_square():
    beta = 0.1
    out = P.dpo_ipo(make_batch(), beta=beta)
    expected = []
    for r in ROWS:
        h_avg = (r["pc"] / r["nc"] - r["rc"] / r["nc"]) - (r["pr"] / r["nr"] - r["rr"] / r["nr"])
        expected.append((h_avg - 1 / (2 * beta)) ** 2)
    assert_values(out.losses, expected)
    # row 0 by hand: h̄ = 0.5/4 + 0.2/5 = 0.165
    assert out.losses[0].item() == pytest.approx((0.165 - 5.0) ** 2, rel=1e-12)
    assert_values(out.chosen_rewards, [beta * 0.5 / 4, beta * -1.0 / 8])


def test_robust_matches_hand_computed_value():
    beta, eps = 0.1, 0.2
    out = P.dpo_robust(make_batch(), beta=beta, label_smoothing=eps)
    expected = [(-(1 - eps) * logsig(beta * h(r)) + eps * logsig(-beta * h(r))) / (1 - 2 * eps) for r in ROWS]
    assert_values(out.losses, expected)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_exo_pair_matches_hand_computed_value(eps):
    beta = 0.1
    e = eps if eps > 0 else 1e-3
    out = P.dpo_exo_pair(make_batch(), beta=beta, label_smoothing=eps)
    expected = []
    for r in ROWS:
        x = beta * h(r)
        expected.append(sig(x) * (logsig(x) - math.log(1 - e)) + sig(-x) * (logsig(-x) - math.log(e)))
    assert_values(out.losses, expected)


def test_nca_pair_matches_hand_computed_value():
    beta = 0.1
    out = P.dpo_nca_pair(make_batch(), beta=beta)
    expected = []
    for r in ROWS:
        c, j = beta * (r["pc"] - r["rc"]), beta * (r["pr"] - r["rr"])
        expected.append(-logsig(c) - 0.5 * logsig(-c) - 0.5 * logsig(-j))
    assert_values(out.losses, expected)


def test_bco_pair_matches_hand_computed_value():
    beta, delta = 0.1, 0.03
    out = P.dpo_bco_pair(make_batch(), beta=beta, delta=delta)
    expected = []
    for r in ROWS:
        c, j = beta * (r["pc"] - r["rc"]), beta * (r["pr"] - r["rr"])
        expected.append(-logsig(c - delta) - logsig(-(j - delta)))
    assert_values(out.losses, expected)


def test_sppo_hard_matches_hand_computed_value():
    beta = 0.1
    out = P.dpo_sppo_hard(make_batch(), beta=beta)
    expected = [(r["pc"] - r["rc"] - 5.0) ** 2 + (r["pr"] - r["rr"] + 5.0) ** 2 for r in ROWS]
    assert_values(out.losses, expected)
    assert out.losses[0].item() == pytest.approx(4.5**2 + 4.8**2, rel=1e-12)


def test_apo_zero_matches_hand_computed_value():
    beta = 0.1
    out = P.dpo_apo_zero(make_batch(), beta=beta)
    expected = [1 - sig(beta * (r["pc"] - r["rc"])) + sig(beta * (r["pr"] - r["rr"])) for r in ROWS]
    assert_values(out.losses, expected)


def test_apo_down_matches_hand_computed_value():
    beta = 0.1
    out = P.dpo_apo_down(make_batch(), beta=beta)
    expected = []
    for r in ROWS:
        c, j = beta * (r["pc"] - r["rc"]), beta * (r["pr"] - r["rr"])
        expected.append(sig(c) + 1 - sig(c - j))
    assert_values(out.losses, expected)


def test_discopop_gates_on_the_beta_scaled_margin():
    beta, tau = 0.1, 0.05
    out = P.dpo_discopop(make_batch(), beta=beta, discopop_tau=tau)
    expected = []
    for r in ROWS:
        rho = beta * h(r)  # 0.07 and -0.2: gate σ(1.4) and σ(-4)
        m = sig(rho / tau)
        expected.append((1 - m) * -logsig(rho) + m * math.exp(-rho))
    assert_values(out.losses, expected)


def test_discopop_is_finite_for_a_hugely_negative_margin():
    rows = [dict(pc=-1000.0, pr=0.0, rc=0.0, rr=0.0, nc=1, nr=1)]  # ρ = -100, exp(-ρ) alone overflows fp32
    out = P.dpo_discopop(make_batch(rows, dtype=torch.float32), beta=0.1)
    assert torch.isfinite(out.losses).all()
    assert out.losses.item() == pytest.approx(100.0, rel=1e-5)  # −log σ(−100) ≈ 100; the gate is ~0


def test_discopop_slope_is_positive_at_zero_margin_as_documented():
    # The LRML loss is not monotone: at policy == reference its gradient lowers the margin.
    rows = [dict(pc=-2.0, pr=-2.0, rc=-2.0, rr=-2.0, nc=1, nr=1)]
    logps = make_batch(rows, requires_grad=True)
    P.dpo_discopop(logps, beta=0.1).losses.sum().backward()
    assert logps.chosen.grad.item() > 0


def test_sigmoid_norm_is_dpo_on_per_token_log_ratios():
    beta = 5.0
    out = P.dpo_sigmoid_norm(make_batch(), beta=beta)
    expected = []
    for r in ROWS:
        h_avg = (r["pc"] - r["rc"]) / r["nc"] - (r["pr"] - r["rr"]) / r["nr"]
        expected.append(-logsig(beta * h_avg))
    assert_values(out.losses, expected)
    assert out.losses[0].item() == pytest.approx(math.log1p(math.exp(-5.0 * 0.165)), rel=1e-12)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_simpo_subtracts_gamma_outside_beta(eps):
    beta, gamma = 2.0, 0.5
    out = P.simpo(make_batch(reference=False), beta=beta, simpo_gamma=gamma, label_smoothing=eps)
    expected = []
    for r in ROWS:
        z = beta * (r["pc"] / r["nc"] - r["pr"] / r["nr"]) - gamma
        expected.append(-(1 - eps) * logsig(z) - eps * logsig(-z))
    assert_values(out.losses, expected)
    if eps == 0:  # row 0: z = 2·(−0.75 + 0.8) − 0.5 = −0.4
        assert out.losses[0].item() == pytest.approx(math.log1p(math.exp(0.4)), rel=1e-12)
    assert_values(out.chosen_rewards, [2.0 * -3.0 / 4, 2.0 * -10.0 / 8])


def test_cpo_matches_hand_computed_value():
    beta, alpha = 0.1, 1.0
    out = P.cpo(make_batch(reference=False), beta=beta, cpo_alpha=alpha)
    expected = [-logsig(beta * (r["pc"] - r["pr"])) + alpha * (-r["pc"] / r["nc"]) for r in ROWS]
    assert_values(out.losses, expected)
    assert_values(out.metrics["nll"], [0.75, 1.25])


def test_orpo_matches_hand_computed_value():
    lam = 0.1
    out = P.orpo(make_batch(reference=False), orpo_lambda=lam)
    expected = []
    for r in ROWS:
        lc, lr = r["pc"] / r["nc"], r["pr"] / r["nr"]
        odds_c = lc - math.log(1 - math.exp(lc))
        odds_r = lr - math.log(1 - math.exp(lr))
        expected.append(-lc - lam * logsig(odds_c - odds_r))
    assert_values(out.losses, expected)
    assert_values(out.chosen_rewards, [-0.75, -1.25])


def test_orpo_log_odds_stay_accurate_when_the_mean_log_prob_is_near_zero():
    # ℓ = -1e-6: naive log(1 - exp(ℓ)) in fp32 loses every digit (exp rounds to 1 - 1.19e-7 steps).
    rows = [dict(pc=-1e-6, pr=-2.0, rc=0.0, rr=0.0, nc=1, nr=1)]
    out = P.orpo(make_batch(rows, dtype=torch.float32, reference=False), orpo_lambda=0.1)
    expected = -1e-6 - math.log(-math.expm1(-1e-6))  # ≈ 13.8155
    assert out.metrics["log_odds_chosen"].item() == pytest.approx(expected, rel=1e-5)


def test_chosen_nll_is_the_per_token_mean():
    assert_values(P.chosen_nll(make_batch()), [3.0 / 4, 10.0 / 8])


# ----------------------------------------------------------------------------- invariants


@pytest.mark.parametrize("beta", [0.01, 0.1, 0.5])
def test_sigmoid_with_policy_equal_to_reference_is_log_2(beta):
    rows = [dict(pc=-3.0, pr=-4.0, rc=-3.0, rr=-4.0, nc=4, nr=5)]
    assert P.dpo_sigmoid(make_batch(rows), beta=beta).losses.item() == math.log(2)
    smoothed = P.dpo_sigmoid(make_batch(rows), beta=beta, label_smoothing=0.2).losses.item()
    assert smoothed == pytest.approx(math.log(2), rel=1e-15)


@pytest.mark.parametrize("beta", [0.05, 0.1, 0.5])
def test_ipo_with_policy_equal_to_reference_is_one_over_four_beta_squared(beta):
    rows = [dict(pc=-3.0, pr=-4.0, rc=-3.0, rr=-4.0, nc=4, nr=5)]
    assert P.dpo_ipo(make_batch(rows), beta=beta).losses.item() == pytest.approx(1 / (4 * beta**2), rel=1e-12)


def test_sppo_hard_with_policy_equal_to_reference_is_one_over_two_beta_squared():
    rows = [dict(pc=-3.0, pr=-4.0, rc=-3.0, rr=-4.0, nc=4, nr=5)]
    assert P.dpo_sppo_hard(make_batch(rows), beta=0.1).losses.item() == pytest.approx(50.0, rel=1e-12)


def test_robust_with_zero_label_smoothing_is_sigmoid():
    logps = make_batch()
    assert torch.equal(P.dpo_robust(logps, beta=0.3).losses, P.dpo_sigmoid(logps, beta=0.3).losses)


def test_robust_rejects_label_smoothing_of_one_half():
    with pytest.raises(ConfigError, match="label_smoothing"):
        P.dpo_robust(make_batch(), label_smoothing=0.5)


def _margins_batch(policy_margins, reference_margins) -> PairedLogps:
    rows = [dict(pc=-5.0 + m, pr=-5.0, rc=-5.0 + q, rr=-5.0, nc=1, nr=1)
            for m, q in zip(policy_margins, reference_margins)]
    return make_batch(rows)


def test_aot_compares_sorted_policy_margins_with_sorted_reference_margins():
    beta = 0.5
    # policy margins [2, -1, 0.5] sort to [-1, 0.5, 2]; reference [-0.5, 1.5, 0] to [-0.5, 0, 1.5]
    out = P.dpo_aot(_margins_batch([2.0, -1.0, 0.5], [-0.5, 1.5, 0.0]), beta=beta)
    expected = [-logsig(beta * d) for d in (-0.5, 0.5, 0.5)]
    assert_values(out.losses, expected, tol=1e-9)
    unsorted = [-logsig(beta * d) for d in (2.5, -2.5, 0.5)]  # pairing rows would give this
    assert out.losses.sum().item() != pytest.approx(sum(unsorted))
    # rewards stay per example, unsorted
    assert_values(out.chosen_rewards, [beta * 2.5, beta * -2.5, beta * 0.5], tol=1e-9)


def test_aot_unpaired_compares_sorted_chosen_and_rejected_log_ratios():
    beta, eps = 0.5, 0.1
    rows = [dict(pc=c, pr=j, rc=0.0, rr=0.0, nc=1, nr=1)
            for c, j in zip([0.3, -0.6, 0.1], [0.2, -0.4, -0.9])]
    out = P.dpo_aot_unpaired(make_batch(rows), beta=beta, label_smoothing=eps)
    # sorted chosen [-0.6, 0.1, 0.3] minus sorted rejected [-0.9, -0.4, 0.2]
    expected = [-(1 - eps) * logsig(beta * d) - eps * logsig(-beta * d) for d in (0.3, 0.5, 0.1)]
    assert_values(out.losses, expected, tol=1e-9)


def test_reference_losses_refuse_a_batch_without_reference_log_probs():
    with pytest.raises(ValueError, match="reference"):
        P.dpo_sigmoid(make_batch(reference=False))


def test_rewards_and_metrics_are_detached():
    logps = make_batch(requires_grad=True)
    for name, spec in LOSSES.items():
        if spec.kind != "paired":
            continue
        out = spec(logps)
        assert out.losses.requires_grad, name
        assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad, name
        assert all(not v.requires_grad for v in out.metrics.values()), name


def test_mismatched_shapes_are_rejected():
    with pytest.raises(ValueError, match="rejected"):
        PairedLogps(chosen=torch.zeros(3), rejected=torch.zeros(2), chosen_tokens=torch.ones(3),
                    rejected_tokens=torch.ones(3))


# ----------------------------------------------------------------------------- gradients

# Params that keep every loss away from kinks and saturations at the gradcheck points.
GRAD_PARAMS = {"sigmoid": dict(label_smoothing=0.1), "robust": dict(label_smoothing=0.1),
               "exo_pair": dict(label_smoothing=0.1), "aot": dict(label_smoothing=0.1),
               "bco_pair": dict(delta=0.02), "simpo": dict(label_smoothing=0.1)}
PAIRED = sorted(n for n, s in LOSSES.items() if s.kind == "paired")
GRAD_ROWS = ROWS + [dict(pc=-2.0, pr=-2.5, rc=-2.2, rr=-2.1, nc=3, nr=3)]  # distinct margins: no sort ties


@pytest.mark.parametrize("name", PAIRED)
def test_gradcheck_wrt_policy_log_probs(name):
    spec = LOSSES[name]
    base = make_batch(GRAD_ROWS)

    def loss(chosen, rejected):
        logps = PairedLogps(chosen=chosen, rejected=rejected, chosen_tokens=base.chosen_tokens,
                            rejected_tokens=base.rejected_tokens, ref_chosen=base.ref_chosen,
                            ref_rejected=base.ref_rejected)
        return spec(logps, **GRAD_PARAMS.get(name, {})).losses

    chosen = base.chosen.clone().requires_grad_(True)
    rejected = base.rejected.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(loss, (chosen, rejected))


# Losses whose gradient always raises the chosen and lowers the rejected log-prob at these rows.
# Not apo_down (it lowers chosen by design) nor discopop (not monotone, see its test).
TOWARD_CHOSEN = ["sigmoid", "hinge", "ipo", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard",
                 "aot", "aot_unpaired", "apo_zero", "sigmoid_norm", "simpo", "cpo", "orpo"]


def test_every_paired_loss_is_classified_for_the_direction_check():
    assert set(TOWARD_CHOSEN) | {"apo_down", "discopop"} == set(PAIRED)


@pytest.mark.parametrize("name", TOWARD_CHOSEN)
def test_one_step_raises_chosen_and_lowers_rejected(name):
    logps = make_batch(requires_grad=True)
    before_c, before_r = logps.chosen.detach().clone(), logps.rejected.detach().clone()
    LOSSES[name](logps).losses.sum().backward()  # defaults: smoothing would pull confident margins back
    assert (logps.chosen.grad < 0).all(), logps.chosen.grad
    assert (logps.rejected.grad > 0).all(), logps.rejected.grad
    with torch.no_grad():
        after_c = logps.chosen - 0.1 * logps.chosen.grad
        after_r = logps.rejected - 0.1 * logps.rejected.grad
    assert (after_c > before_c).all() and (after_r < before_r).all()
