"""Every registered loss is finite in value and gradient over the whole input domain.

Log-probs live in (-inf, 0]: a sequence the model is sure of has log p = 0 exactly, and
float32 rounds log p within ~3e-8 of 0 to values where 1 - e^l is 0. A loss must not turn
such inputs into inf or NaN, in its value or (through torch.where's unused branch) its
gradient. The sweep walks soup.losses.registry.LOSSES, so a new loss is covered at once.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from soup.losses.preference import PairedLogps
from soup.losses.registry import LOSSES
from soup.losses.unpaired import UnpairedLogps

# Summed log-probs of a completion: exactly certain, a float32 hair from it, ordinary, extreme.
EXTREME_LOGPS = [0.0, -1e-9, -1e-8, -3e-8, -1e-6, -0.5, -7.0, -300.0, -1e4]
LENGTHS = [1.0, 7.0]


def grid(dtype):
    """All (policy, reference, length) triples of the extreme values, as [n] tensors."""
    rows = list(itertools.product(EXTREME_LOGPS, EXTREME_LOGPS, LENGTHS))
    policy, reference, length = (torch.tensor(col, dtype=dtype) for col in zip(*rows))
    return policy, reference, length


def paired_inputs(dtype):
    policy, reference, length = grid(dtype)
    chosen = policy.clone().requires_grad_(True)
    rejected = policy.flip(0).clone().requires_grad_(True)
    logps = PairedLogps(chosen=chosen, rejected=rejected, chosen_tokens=length, rejected_tokens=length.flip(0),
                        ref_chosen=reference, ref_rejected=reference.flip(0))
    return logps, [chosen, rejected]


def unpaired_inputs(dtype):
    policy, reference, length = grid(dtype)
    logps = policy.clone().requires_grad_(True)
    desirable = torch.arange(len(policy)) % 2 == 0
    # KTO's KL baseline is detached by design, so only the policy log-probs get a gradient.
    inputs = UnpairedLogps(logps=logps, tokens=length, desirable=desirable, ref_logps=reference,
                           kl_logps=policy.flip(0), kl_ref_logps=reference.flip(0))
    return inputs, [logps]


INPUTS = {"paired": paired_inputs, "unpaired": unpaired_inputs}


def test_the_sweep_knows_every_kind_of_registered_loss():
    assert {spec.kind for spec in LOSSES.values()} <= set(INPUTS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_value_and_gradient_are_finite_on_extreme_log_probs(name, dtype):
    spec = LOSSES[name]
    logps, leaves = INPUTS[spec.kind](dtype)
    out = spec(logps)
    assert torch.isfinite(out.losses).all(), f"{name}: non-finite loss {out.losses}"
    out.losses.sum().backward()
    for leaf in leaves:
        assert leaf.grad is not None and torch.isfinite(leaf.grad).all(), f"{name}: non-finite gradient {leaf.grad}"


def test_orpo_gradient_is_finite_when_the_mean_log_prob_is_a_float32_hair_from_zero():
    # Was NaN: torch.where evaluated log1p(-exp(l)) = log1p(-1) = -inf on the unused branch.
    chosen = torch.tensor([-1e-8], requires_grad=True)  # exp() rounds to 1.0 in float32
    rejected = torch.tensor([-2.0], requires_grad=True)
    one = torch.ones(1)
    out = LOSSES["orpo"](PairedLogps(chosen=chosen, rejected=rejected, chosen_tokens=one, rejected_tokens=one))
    out.losses.sum().backward()
    assert torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()
