"""LoRA+ and lr_groups in the optimizer, NEFTune, layer freezing, peft config rules."""

import math

import pytest
import torch
from omegaconf import OmegaConf

from soup.config import validate
from soup.config.schema import ModelConfig, OptimConfig, PeftConfig
from soup.errors import ConfigError
from soup.models.load import apply_peft, build_model
from soup.models.neftune import add_neftune, neftune_scale
from soup.models.tokenizer import build_byte_tokenizer
from soup.optim import build_optimizer
from tests.unit.config.test_compose import check, make


def tiny_model():
    cfg = OmegaConf.structured(ModelConfig)
    cfg.name = "tiny"
    cfg.tiny.hidden_size, cfg.tiny.intermediate_size, cfg.tiny.num_hidden_layers = 32, 64, 3
    cfg.tiny.num_attention_heads, cfg.tiny.num_key_value_heads = 2, 1
    return build_model(cfg, build_byte_tokenizer(), seed=0)


def peft_cfg(**fields):
    cfg = OmegaConf.structured(PeftConfig)
    cfg.name = "lora"
    cfg.merge_with(fields)
    return cfg


def optim_cfg(**fields):
    cfg = OmegaConf.structured(OptimConfig)
    cfg.name, cfg.lr = "adamw", 1e-3
    cfg.merge_with(fields)
    return cfg


def test_loraplus_gives_b_matrices_lr_times_ratio():
    peft = peft_cfg(loraplus_lr_ratio=16.0)
    model = apply_peft(tiny_model(), peft, seed=0)
    optimizer = build_optimizer(model, optim_cfg(), peft)
    by_id = {id(p): name for name, p in model.named_parameters()}
    for group in optimizer.param_groups:
        names = [by_id[id(p)] for p in group["params"]]
        expected = 1e-3 * 16 if all(".lora_B." in n for n in names) else 1e-3
        assert all((".lora_B." in n) == (expected > 1e-3) for n in names)
        assert group["lr"] == pytest.approx(expected)
    assert sorted({round(g["lr"], 9) for g in optimizer.param_groups}) == [1e-3, 1.6e-2]


def test_lr_groups_first_match_wins():
    model = tiny_model()
    groups = [{"pattern": r"layers\.0\.", "lr": 1e-5}, {"pattern": r"layers\.", "lr": 1e-4}]
    optimizer = build_optimizer(model, optim_cfg(lr_groups=groups))
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for param in group["params"]:
            name = names[id(param)]
            expected = 1e-5 if ".layers.0." in name else 1e-4 if ".layers." in name else 1e-3
            assert group["lr"] == pytest.approx(expected), name


def test_lr_group_matching_nothing_is_an_error():
    with pytest.raises(ConfigError, match="match no trainable parameter"):
        build_optimizer(tiny_model(), optim_cfg(lr_groups=[{"pattern": "nonexistent", "lr": 1e-4}]))


def test_neftune_adds_noise_of_the_paper_scale_in_training_only():
    model = tiny_model()
    ids = torch.randint(5, 200, (2, 10))
    embeddings = model.get_input_embeddings()
    clean = embeddings(ids)
    add_neftune(model, alpha=5.0)
    model.eval()
    assert torch.equal(embeddings(ids), clean)
    model.train()
    noise = embeddings(ids) - clean
    scale = 5.0 / math.sqrt(10 * 32)
    assert neftune_scale(5.0, 10, 32) == pytest.approx(scale)
    assert noise.abs().max() <= scale + 1e-7 and noise.abs().max() > scale / 2


def test_freeze_layers_freezes_the_bottom_blocks_of_a_full_fine_tune():
    model = apply_peft(tiny_model(), peft_cfg(name="none", freeze_layers=2), seed=0)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert any(".layers.0." in n for n in frozen) and any(".layers.1." in n for n in frozen)
    assert not any(".layers.2." in n for n in frozen)


def test_freeze_ratio_puts_lora_on_unfrozen_layers_only():
    model = apply_peft(tiny_model(), peft_cfg(freeze_ratio=0.67), seed=0)
    lora = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert lora and all(".layers.2." in n for n in lora)


def test_freezing_every_layer_is_refused():
    with pytest.raises(ConfigError, match="leaving none"):
        apply_peft(tiny_model(), peft_cfg(freeze_layers=3), seed=0)


@pytest.mark.parametrize("overrides,flag", [
    (["peft=vera", "peft.alpha=32"], "peft.alpha"),
    (["peft=lora", "peft.vera_d_initial=0.5"], "peft.vera_d_initial"),
    (["peft=pissa", "peft.init=gaussian"], "peft.init"),
    (["peft=none", "peft.loraplus_lr_ratio=4"], "peft.loraplus_lr_ratio"),
    (["peft=lora", "peft.freeze_layers=1", "peft.freeze_ratio=0.5"], "peft.freeze_ratio"),
    (["train.neftune_alpha=-1"], "train.neftune_alpha"),
    (["optim.lr_groups=[{pattern: '(', lr: 1e-4}]"], "optim.lr_groups[0].pattern"),
    (["peft=lora", "peft.rank_pattern=[1]"], "peft.rank_pattern"),
])
def test_peft_rules_name_the_flag(overrides, flag):
    with pytest.raises(ConfigError) as info:
        check(*overrides)
    assert flag in str(info.value)


@pytest.mark.parametrize("variant", ["lora", "dora", "rslora", "vera", "olora", "pissa"])
def test_each_cpu_variant_validates_with_its_defaults(variant):
    check(f"peft={variant}")
