"""The real config composes; typos and wrong types fail at compose time; cross-group rules fire."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from soup.config import register_configs, validate
from soup.config.schema import GROUP_SCHEMAS
from soup.errors import ConfigError

CONF = Path(__file__).resolve().parents[3] / "conf"
register_configs()
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="the rule rejects a CUDA-only flag on a CPU machine")


def make(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose(config_name="config", overrides=list(overrides))


def check(*overrides):
    """Compose and validate as `python -m soup.train <overrides>` would (the overrides count as set)."""
    validate(make(*overrides), overrides)


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_default_config_composes_and_validates():
    cfg = make()
    validate(cfg)
    assert cfg.task.name == "sft" and cfg.model.name == "tiny" and cfg.data.name == "demo"


@pytest.mark.parametrize("group", sorted(GROUP_SCHEMAS))
def test_every_option_is_typed_by_its_group_schema(group):
    for option in options(group):
        overrides = [f"{group}={option}"]
        if (group, option) == ("model", "hf"):
            overrides.append("model.path=/some/dir")
        if (group, option) == ("data", "file"):
            overrides += ["data.train_file=x.jsonl", "train.eval_every_steps=0"]
        cfg = make(*overrides)
        schema = OmegaConf.get_type(cfg[group])
        assert schema is not None and issubclass(schema, GROUP_SCHEMAS[group]), f"{group}/{option}.yaml lacks its schema"
        # kernels=chunked_ce is a preset: stock modules (name none) with the chunked loss.
        assert cfg[group].name == {("kernels", "chunked_ce"): "none"}.get((group, option), option)


def test_debug_preset_overrides_the_root_defaults():
    assert make("debug=tiny").train.max_steps == 6


def test_unknown_key_fails_at_compose_time():
    with pytest.raises(ConfigCompositionException, match="hiden_size"):
        make("model.tiny.hiden_size=3")


def test_wrong_type_fails_at_compose_time():
    with pytest.raises(ConfigCompositionException, match="micro_batch_size"):
        make("train.micro_batch_size=eight")


def test_unknown_group_option_fails_at_compose_time():
    with pytest.raises(ConfigCompositionException, match="optim"):
        make("optim=adamz")


def test_every_debug_and_experiment_preset_composes(tmp_path):
    # The RLHF presets read the stage before them: rlhf_ppo scores with stage 2's final/.
    stage_outputs = {"rlhf_ppo": [f"task.reward=[{saved_reward_model(tmp_path)}]"]}
    for group in ("debug", "experiment"):
        for option in options(group):
            overrides = [f"{group}={option}", *stage_outputs.get(option, [])]
            validate(make(*overrides), overrides)


def test_the_ppo_preset_names_the_missing_reward_model_of_stage_2():
    with pytest.raises(ConfigError, match=r"task.reward=runs/rlhf/rm/final: no such directory"):
        validate(make("experiment=rlhf_ppo"))


def saved_reward_model(root: Path) -> Path:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from soup.models.tokenizer import build_byte_tokenizer

    tokenizer = build_byte_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=1)
    LlamaForSequenceClassification(config).save_pretrained(root / "rm")
    tokenizer.save_pretrained(root / "rm")
    return root / "rm"


@pytest.mark.parametrize(
    "overrides,flag",
    [
        (["model=hf"], "model.path"),
        (["model.path=/x"], "model.path"),
        (["data.val_file=v.jsonl"], "data.val_file"),
        pytest.param(["train.precision=fp16"], "train.precision=fp16", marks=cpu_only),
        pytest.param(["model.attn_implementation=flash_attention_2"], "flash_attention_2", marks=cpu_only),
        pytest.param(["train.device=cuda"], "train.device=cuda", marks=cpu_only),
        (["optim.momentum=0.9"], "optim.momentum"),
        (["task=pretrain", "data.format=alpaca"], "task=pretrain"),
        (["data.format=plaintext"], "task=sft"),
        (["data.val_split=0", "train.eval_every_steps=10"], "train.eval_every_steps"),
        (["quant.name=4bit"], "quant"),
        (["model.dtype=bfloat16"], "model.dtype=bfloat16"),
        (["sched=constant", "sched.min_lr_ratio=0.5"], "sched.min_lr_ratio"),
        (["resume=/does/not/exist"], "resume"),
    ],
)
def test_cross_group_rules_name_the_flag(overrides, flag):
    cfg = make(*overrides)
    with pytest.raises(ConfigError) as info:
        validate(cfg, overrides)
    assert flag in str(info.value)


def test_all_problems_are_reported_together():
    cfg = make("optim.lr=-1", "data.val_split=2")
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert "data.val_split" in str(info.value) and "optim.lr" in str(info.value)
