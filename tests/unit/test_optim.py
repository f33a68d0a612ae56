"""Parameter groups, schedules, and the optimizer zoo: each option builds from its yaml,
steps, resumes bit-exactly, and keeps per-group learning rates."""

import copy
import math
import sys

import pytest
import torch
from omegaconf import OmegaConf

from soup.checkpoint import load_checkpoint, save_checkpoint
from soup.config import validate
from soup.config.schema import ModelConfig, OptimConfig
from soup.config.validate import OPTIMIZERS
from soup.errors import ConfigError, MissingDependency
from soup.models.load import apply_peft, build_model
from soup.models.tokenizer import build_byte_tokenizer
from soup.optim import (BUILDERS, build_optimizer, build_scheduler, effective_optimizer, galore_parameters,
                        lr_multiplier, parameter_groups, prepare_for_eval, prepare_for_train)
from tests.unit.config.test_compose import check, cpu_only, make, options
from tests.unit.models.test_adapters import peft_cfg

# Paged optimizers need CUDA to page; on CPU bitsandbytes runs their unpaged code path
# (with a warning), which still exercises our glue. validate() refuses them on CPU.
pytestmark = pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")


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
    cfg = OmegaConf.structured(OptimConfig)
    cfg.name, cfg.lr = name, 0.1
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


# --- the optimizer zoo: each option builds from its yaml, steps, resumes exactly, keeps lr groups ---

# GaLore at rank 4 (below the 64-wide matrices) refreshes its projection every 2 steps, so a
# refresh falls after the resume point of the round-trip test; the 2-step warmup ends before it.
ZOO_OVERRIDES = {"galore": ["optim.galore_rank=4", "optim.galore_update_proj_gap=2"]}


def zoo_cfg(name, *overrides):
    return make(f"optim={name}", "sched=constant", "sched.warmup_steps=2", *ZOO_OVERRIDES.get(name, []), *overrides)


def wide_tiny_model(seed=0):
    """Matrices of >= 4096 elements, so bitsandbytes' 8-bit state is really 8-bit."""
    cfg = OmegaConf.structured(ModelConfig)
    cfg.name = "tiny"
    cfg.tiny.hidden_size, cfg.tiny.intermediate_size, cfg.tiny.num_hidden_layers = 64, 128, 2
    cfg.tiny.num_attention_heads, cfg.tiny.num_key_value_heads = 2, 1
    return build_model(cfg, build_byte_tokenizer(), seed=seed)


def train_steps(model, optimizer, scheduler, steps, first_step=0):
    for step in range(first_step, first_step + steps):
        ids = torch.randint(3, 250, (2, 12), generator=torch.Generator().manual_seed(step))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)


def test_every_optimizer_has_a_builder_and_a_yaml():
    assert set(OPTIMIZERS) == set(BUILDERS) == set(options("optim")) - {"optim_schema"}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_builds_from_its_yaml_and_one_step_changes_every_weight(name):
    cfg = zoo_cfg(name)
    model = wide_tiny_model()
    optimizer = build_optimizer(model, cfg.optim, cfg.peft)
    scheduler = build_scheduler(optimizer, cfg.sched, total_steps=10)
    before = copy.deepcopy(model.state_dict())
    train_steps(model, optimizer, scheduler, 1)
    unchanged = [n for n, p in model.named_parameters() if torch.equal(before[n], p)]
    assert not unchanged, f"optim={name} left {unchanged} untouched"


@pytest.mark.parametrize("name", ["adamw_8bit", "paged_adamw_8bit", "lion_8bit"])
def test_8bit_optimizers_keep_8bit_state_for_large_matrices(name):
    cfg = zoo_cfg(name)
    model = wide_tiny_model()
    optimizer = build_optimizer(model, cfg.optim)
    train_steps(model, optimizer, build_scheduler(optimizer, cfg.sched, 10), 1)
    gate = model.model.layers[0].mlp.gate_proj.weight  # 128 x 64 = 8192 elements
    norm = model.model.layers[0].input_layernorm.weight  # 64 elements: bitsandbytes keeps 32 bits
    assert optimizer.state[gate]["state1"].dtype == torch.uint8
    assert optimizer.state[norm]["state1"].dtype == torch.float32


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_checkpoint_round_trip_gives_identical_next_steps(name, tmp_path):
    """What resume does: save after 3 steps, load into a fresh model + optimizer, 3 more steps."""
    cfg = zoo_cfg(name)

    def fresh(seed):
        model = wide_tiny_model(seed)
        optimizer = build_optimizer(model, cfg.optim, cfg.peft)
        return model, optimizer, build_scheduler(optimizer, cfg.sched, total_steps=6)

    model, optimizer, scheduler = fresh(seed=0)
    train_steps(model, optimizer, scheduler, 3)
    path = save_checkpoint(tmp_path, 3, model, optimizer, scheduler, {"step": 3}, keep_last=1)
    train_steps(model, optimizer, scheduler, 3, first_step=3)

    resumed, optimizer2, scheduler2 = fresh(seed=1)  # other weights: the checkpoint must restore them
    load_checkpoint(path, resumed, optimizer2, scheduler2)  # optimizer.pt loads with weights_only=True
    prepare_for_train(optimizer2)
    train_steps(resumed, optimizer2, scheduler2, 3, first_step=3)
    for (param_name, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), f"optim={name}: {param_name} differs after resume"


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_loraplus_b_matrices_keep_their_lr_with_every_optimizer(name):
    cfg = zoo_cfg(name)
    peft = peft_cfg(loraplus_lr_ratio=16.0)
    model = apply_peft(wide_tiny_model(), peft, seed=0)
    optimizer = build_optimizer(model, cfg.optim, peft)
    scheduler = build_scheduler(optimizer, make("sched=constant").sched, total_steps=10)
    train_steps(model, optimizer, scheduler, 1)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = 0
    for group in optimizer.param_groups:
        for param in group["params"]:
            expected = cfg.optim.lr * (16 if ".lora_B." in names[id(param)] else 1)
            assert group["lr"] == pytest.approx(expected), names[id(param)]
            seen += 1
    assert seen == sum(p.requires_grad for p in model.parameters())


def test_misspelt_optimizer_is_rejected_listing_the_valid_ones():
    cfg = make("optim.name=lionn")
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert "optim='lionn' is not an option" in str(info.value)
    assert all(name in str(info.value) for name in OPTIMIZERS)


@pytest.mark.parametrize("name", [n for n in OPTIMIZERS if not n.startswith("paged_")])
def test_every_cpu_optimizer_yaml_validates(name):
    check(f"optim={name}", *(["sched=constant"] if name == "schedule_free_adamw" else []))


@pytest.mark.parametrize(
    "overrides,flag",
    [
        (["optim=adafactor", "optim.betas=[0.9,0.99]"], "optim.betas"),
        (["optim=lion", "optim.eps=1e-6"], "optim.eps"),
        (["optim=adamw", "optim.galore_rank=8"], "optim.galore_rank"),
        (["optim=sgd", "optim.implementation=fused"], "optim.implementation"),
        (["optim=adamw_8bit", "optim.momentum=0.9"], "optim.momentum"),
        (["optim=adamw", "optim.implementation=fast"], "optim.implementation='fast'"),
        (["optim=galore", "peft=lora"], "peft=lora"),
        (["optim=galore", "optim.galore_proj_type=diagonal"], "optim.galore_proj_type"),
        (["optim=schedule_free_adamw"], "sched=constant"),  # the default sched is cosine
        pytest.param(["optim=paged_adamw_8bit"], "optim=adamw_8bit", marks=cpu_only),
        pytest.param(["optim=paged_adamw"], "optim=adamw", marks=cpu_only),
    ],
)
def test_optimizer_rules_name_the_flag_and_the_fix(overrides, flag):
    with pytest.raises(ConfigError) as info:
        check(*overrides)
    assert flag in str(info.value)


def test_adamw_auto_picks_the_fused_kernel_on_cpu_and_honours_an_explicit_choice():
    def kernel(implementation):
        cfg = make("optim=adamw", f"optim.implementation={implementation}").optim
        return effective_optimizer(build_optimizer(torch.nn.Linear(4, 4), cfg))

    assert kernel("auto") == "torch.AdamW(fused)"  # torch 2.13 has a fused CPU AdamW
    assert kernel("foreach") == "torch.AdamW(foreach)"
    assert kernel("for_loop") == "torch.AdamW(for_loop)"


def test_galore_projects_decoder_matrices_only_into_rank_r_moments():
    cfg = zoo_cfg("galore")
    model = wide_tiny_model()
    optimizer = build_optimizer(model, cfg.optim)
    train_steps(model, optimizer, build_scheduler(optimizer, cfg.sched, 10), 1)
    names = {id(p): n for n, p in model.named_parameters()}
    projected = sorted(names[i] for i in galore_parameters(model))
    assert projected == sorted(n for n, p in model.named_parameters() if ".layers." in n and p.ndim == 2)
    q_proj = model.model.layers[0].self_attn.q_proj.weight  # 64 x 64: G @ P^T keeps 4 columns
    assert optimizer.state[q_proj]["exp_avg"].shape == (64, 4)
    embed = model.model.embed_tokens.weight
    assert optimizer.state[embed]["exp_avg"].shape == embed.shape


class Scalar(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([1.0]))


def test_schedule_free_trains_at_y_and_evaluates_at_the_average_x():
    # Two steps of gradient 0.5, lr 0.1, beta1 0.9 (arXiv 2405.15682, Alg. 1, by hand):
    # the Adam-normalised gradient is 1 both times; z: 1 -> 0.9 -> 0.8; the averaging
    # weights are lr^2 each, so c = 1 then 1/2 and x: 0.9 -> (0.9 + 0.8) / 2 = 0.85;
    # the gradient point y = 0.1 z + 0.9 x = 0.845.
    model = Scalar()
    cfg = make("optim=schedule_free_adamw", "optim.lr=0.1", "sched=constant")
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.sched, total_steps=2)
    for _ in range(2):
        model.w.grad = torch.tensor([0.5])
        optimizer.step()
        scheduler.step()
    assert model.w.item() == pytest.approx(0.845, abs=1e-6)
    prepare_for_eval(optimizer)
    prepare_for_eval(optimizer)  # idempotent
    assert model.w.item() == pytest.approx(0.85, abs=1e-6)
    prepare_for_train(optimizer)
    prepare_for_train(optimizer)
    assert model.w.item() == pytest.approx(0.845, abs=1e-6)


def test_schedule_free_takes_its_warmup_from_sched_and_the_scheduler_stays_flat():
    model = Scalar()
    cfg = make("optim=schedule_free_adamw", "optim.lr=0.1", "sched=constant", "sched.warmup_steps=4")
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.sched, total_steps=10)
    scheduled = []
    for _ in range(5):
        model.w.grad = torch.tensor([0.5])
        optimizer.step()
        scheduler.step()
        scheduled.append(optimizer.param_groups[0]["scheduled_lr"])
        assert optimizer.param_groups[0]["lr"] == 0.1
    assert scheduled == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1])


def test_prepare_hooks_leave_other_optimizers_alone():
    model = Scalar()
    optimizer = build_optimizer(model, make("optim=adamw").optim)
    prepare_for_eval(optimizer)
    prepare_for_train(optimizer)
    assert model.w.item() == 1.0


def test_missing_optional_package_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "schedulefree", None)  # as if not installed
    cfg = make("optim=schedule_free_adamw", "sched=constant")
    with pytest.raises(ConfigError, match=r"soup-harness\[optim\]"):
        validate(cfg)
    with pytest.raises(MissingDependency, match=r"pip install 'soup-harness\[optim\]'"):
        build_optimizer(Scalar(), cfg.optim)
