"""KTO and BCO on unpaired rows, and BCO's running reward mean, against hand-computed values."""

import math

import pytest
import torch

from soup.losses.unpaired import RunningMean, UnpairedLogps, bco, kto

# log-ratios r = logps − ref_logps: +0.5, −0.2, +0.3; rows 0 and 2 desirable.
# mismatched-pair log-ratios kl_logps − kl_ref_logps: +0.4, +0.1, −0.2 -> mean 0.1 = z0
ROWS = [
    dict(logps=-3.0, ref=-3.5, desirable=True, kl=-6.0, kl_ref=-6.4, n=4),
    dict(logps=-4.0, ref=-3.8, desirable=False, kl=-5.0, kl_ref=-5.1, n=5),
    dict(logps=-2.0, ref=-2.3, desirable=True, kl=-7.2, kl_ref=-7.0, n=3),
]


def make_batch(rows=ROWS, requires_grad=False, kl=True) -> UnpairedLogps:
    def t(key):
        return torch.tensor([r[key] for r in rows], dtype=torch.float64)

    logps = t("logps").requires_grad_(requires_grad)
    return UnpairedLogps(logps=logps, tokens=torch.tensor([r["n"] for r in rows]),
                         desirable=torch.tensor([r["desirable"] for r in rows]), ref_logps=t("ref"),
                         kl_logps=t("kl") if kl else None, kl_ref_logps=t("kl_ref") if kl else None)


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def test_kto_matches_hand_computed_value():
    beta, lam_d, lam_u = 0.1, 1.0, 1.5
    out = kto(make_batch(), beta=beta, desirable_weight=lam_d, undesirable_weight=lam_u)
    z0 = ((-6.0 + 6.4) + (-5.0 + 5.1) + (-7.2 + 7.0)) / 3  # 0.1
    expected = [lam_d * (1 - sig(beta * (0.5 - z0))),
                lam_u * (1 - sig(beta * (z0 - -0.2))),
                lam_d * (1 - sig(beta * (0.3 - z0)))]
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-12)
    assert out.metrics["kl"].item() == pytest.approx(0.1, rel=1e-12)
    assert out.rewards.tolist() == pytest.approx([0.05, -0.02, 0.03], rel=1e-12)
    assert out.chosen_rewards.tolist() == pytest.approx([0.05, 0.03], rel=1e-12)
    assert out.rejected_rewards.tolist() == pytest.approx([-0.02], rel=1e-12)
    assert out.metrics["rewards/chosen"].item() == pytest.approx(0.04, rel=1e-12)
    assert out.metrics["rewards/rejected"].item() == pytest.approx(-0.02, rel=1e-12)
    assert out.metrics["count/chosen"].item() == 2 and out.metrics["count/rejected"].item() == 1


def test_kto_reference_point_is_clamped_at_zero():
    rows = [dict(r, kl=r["kl_ref"] - 1.0) for r in ROWS]  # mismatched log-ratios all −1
    out = kto(make_batch(rows), beta=0.1)
    assert out.metrics["kl"].item() == 0.0
    assert out.losses[0].item() == pytest.approx(1 - sig(0.1 * 0.5), rel=1e-12)


def test_kto_sends_no_gradient_through_the_kl_baseline():
    logps = make_batch(requires_grad=True)
    logps.kl_logps.requires_grad_(True)
    out = kto(logps, beta=0.1)
    assert not out.metrics["kl"].requires_grad
    out.losses.sum().backward()
    assert logps.kl_logps.grad is None
    assert logps.logps.grad is not None


def test_kto_gradient_raises_desirable_and_lowers_undesirable_rows():
    logps = make_batch(requires_grad=True)
    kto(logps).losses.sum().backward()
    grad = logps.logps.grad
    assert grad[0] < 0 and grad[2] < 0 and grad[1] > 0


def test_kto_requires_the_mismatched_pairs():
    with pytest.raises(ValueError, match="kl_logps"):
        kto(make_batch(kl=False))


def test_kto_metrics_are_nan_for_an_absent_class():
    rows = [dict(r, desirable=True) for r in ROWS]
    out = kto(make_batch(rows))
    assert math.isnan(out.metrics["rewards/rejected"].item())
    assert out.metrics["count/rejected"].item() == 0
    assert out.rejected_rewards.numel() == 0


def test_kto_gradcheck():
    base = make_batch()

    def loss(values):
        return kto(UnpairedLogps(logps=values, tokens=base.tokens, desirable=base.desirable,
                                 ref_logps=base.ref_logps, kl_logps=base.kl_logps,
                                 kl_ref_logps=base.kl_ref_logps), beta=0.5, undesirable_weight=1.3).losses

    assert torch.autograd.gradcheck(loss, (base.logps.clone().requires_grad_(True),))


def test_bco_matches_hand_computed_value():
    beta, delta = 0.1, 0.02
    out = bco(make_batch(kl=False), beta=beta, delta=delta)
    expected = [-logsig(0.05 - delta), -logsig(-(-0.02 - delta)), -logsig(0.03 - delta)]
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-12)
    assert out.rewards.tolist() == pytest.approx([0.05, -0.02, 0.03], rel=1e-12)


def test_bco_gradcheck_and_direction():
    base = make_batch(kl=False)

    def loss(values):
        return bco(UnpairedLogps(logps=values, tokens=base.tokens, desirable=base.desirable,
                                 ref_logps=base.ref_logps), beta=0.5, delta=0.1).losses

    values = base.logps.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(loss, (values,))
    loss(values).sum().backward()
    assert values.grad[0] < 0 and values.grad[2] < 0 and values.grad[1] > 0


def test_running_mean_is_the_exact_mean_of_all_values_seen():
    mean = RunningMean()
    assert mean.value == 0.0
    mean.update(torch.tensor([1.0, 2.0, 3.0]))
    mean.update(torch.tensor([[4.0]]))
    mean.update(torch.tensor([]))  # an empty update changes nothing
    assert mean.value == pytest.approx(2.5, rel=1e-15)
    assert mean.count == 4


def test_running_mean_resumes_exactly_from_its_state_dict():
    torch.manual_seed(0)
    chunks = [torch.randn(n, dtype=torch.float64) for n in (3, 5, 2, 7)]
    straight = RunningMean()
    for chunk in chunks:
        straight.update(chunk)
    first = RunningMean()
    for chunk in chunks[:2]:
        first.update(chunk)
    resumed = RunningMean()
    resumed.load_state_dict(first.state_dict())
    for chunk in chunks[2:]:
        resumed.update(chunk)
    assert resumed.state_dict() == straight.state_dict()
    assert straight.value == pytest.approx(torch.cat(chunks).mean().item(), rel=1e-12)


def test_desirable_must_be_bool():
    with pytest.raises(ValueError, match="bool"):
        UnpairedLogps(logps=torch.zeros(2), tokens=torch.ones(2), desirable=torch.tensor([1, 0]),
                      ref_logps=torch.zeros(2))
