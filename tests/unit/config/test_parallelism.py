"""parallelism=ddp and fsdp2 at config load: what they cannot do yet is refused naming the flags and the fix."""

import pytest
from hydra import compose, initialize_config_dir

from soup.config import register_configs, validate
from soup.distributed import SINGLE, World, check_launch
from soup.errors import ConfigError
from tests.conftest import REPO_ROOT

register_configs()


def validated(*overrides):
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=list(overrides))
    validate(cfg, list(overrides))


@pytest.mark.parametrize("overrides, says", [
    (["offload=disk"], "parallelism=ddp with offload=disk"),
    (["task=dpo", "task.reference=precomputed", "task.ref_cache_dir=/tmp/x"],
     "parallelism=ddp with task.reference=precomputed"),
])
def test_what_ddp_cannot_do_yet_is_refused(overrides, says):
    with pytest.raises(ConfigError, match=says):
        validated("parallelism=ddp", *overrides)


@pytest.mark.parametrize("overrides, says", [
    (["quant=8bit", "peft=lora"], "parallelism=fsdp2 with quant=8bit"),
    (["kernels=compile"], "parallelism=fsdp2 with kernels=compile"),
    (["kernels=auto"], "parallelism=fsdp2 with kernels=auto"),
    (["parallelism.cpu_offload=true"], "parallelism.cpu_offload=true moves state"),
    (["offload=disk"], "parallelism=fsdp2 with offload=disk"),
])
def test_what_fsdp2_cannot_do_yet_is_refused(overrides, says):
    with pytest.raises(ConfigError, match=says):
        validated("parallelism=fsdp2", *overrides)


@pytest.mark.parametrize("overrides, says", [
    (["train.precision=fp16"], "deepspeed_zero3 with train.precision=fp16"),
    (["parallelism.offload_param=true"], "parallelism.offload_param=true moves state"),
])
def test_what_deepspeed_cannot_do_yet_is_refused(overrides, says):
    with pytest.raises(ConfigError, match=says):
        validated("parallelism=deepspeed_zero3", *overrides)


def test_fsdp2_settings_are_refused_without_fsdp2():
    with pytest.raises(ConfigError, match="parallelism.reshard_after_forward=false is set, but this run does not"):
        validated("parallelism=ddp", "parallelism.reshard_after_forward=false")


def test_ddp_and_fsdp2_compose_with_the_rest():
    validated("parallelism=ddp", "peft=lora", "kernels=compile")
    validated("parallelism=ddp", "kernels=auto")  # every rank takes rank 0's pick
    validated("parallelism=fsdp2", "task=grpo", "task.beta=0.1", "task.ref_sync_steps=2")
    validated("parallelism=deepspeed_zero3", "task=grpo")
    validated("parallelism=fsdp2", "peft=lora", "quant=4bit")
    validated("parallelism=fsdp2", "peft=lora", "task=dpo", "parallelism.reshard_after_forward=false")
    with pytest.raises(ConfigError, match="parallelism.offload_param=false is set, but this run does not read it"):
        validated("parallelism=deepspeed_zero2", "parallelism.offload_param=false")


def test_launch_checks_name_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError, match="torchrun --nproc_per_node 2 -m soup.train parallelism=ddp"):
        check_launch("ddp", SINGLE)
    with pytest.raises(ConfigError, match="add parallelism=ddp"):
        check_launch("single", World(0, 2, 0))
    check_launch("single", SINGLE)
