import math

import pytest
import torch
from omegaconf import OmegaConf

from soup.optim import build_optimizer, lr_multiplier, parameter_groups


class TwoLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)
        self.norm = torch.nn.LayerNorm(4)
        self.frozen = torch.nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def sched(name, **kw):
    base = {"name": name, "warmup_steps": 0, "warmup_ratio": 0.0, "min_lr_ratio": 0.0}
    base.update(kw)
    return OmegaConf.create(base)


def test_weight_decay_skips_biases_and_norms_and_frozen_params():
    model = TwoLayer()
    decay, no_decay = parameter_groups(model, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model.linear.weight)}
    assert {id(p) for p in no_decay["params"]} == {id(model.linear.bias), id(model.norm.weight), id(model.norm.bias)}


@pytest.mark.parametrize("name,cls", [("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)])
def test_build_optimizer_by_name(name, cls):
    cfg = OmegaConf.create({"name": name, "lr": 0.1, "weight_decay": 0.0, "betas": [0.9, 0.99], "eps": 1e-8,
                            "momentum": 0.5, "nesterov": False})
    assert isinstance(build_optimizer(TwoLayer(), cfg), cls)


def test_warmup_is_linear_then_constant():
    cfg = sched("constant", warmup_steps=3)
    assert [lr_multiplier(s, 10, cfg) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]


def test_cosine_goes_from_peak_to_floor():
    cfg = sched("cosine", min_lr_ratio=0.1)
    assert lr_multiplier(0, 100, cfg) == pytest.approx(1.0)
    assert lr_multiplier(50, 100, cfg) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_multiplier(100, 100, cfg) == pytest.approx(0.1)


def test_linear_decay_midpoint():
    cfg = sched("linear", warmup_steps=10)
    assert lr_multiplier(10, 110, cfg) == pytest.approx(1.0)
    assert lr_multiplier(60, 110, cfg) == pytest.approx(0.5)
    assert math.isclose(lr_multiplier(110, 110, cfg), 0.0, abs_tol=1e-12)


def test_warmup_ratio_counts_steps_of_the_run():
    cfg = sched("constant", warmup_ratio=0.5)
    assert lr_multiplier(4, 10, cfg) < 1.0 and lr_multiplier(5, 10, cfg) == 1.0
