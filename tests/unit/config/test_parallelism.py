"""parallelism=ddp at config load: what it cannot do yet is refused naming the flags and the fix."""

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
    (["kernels=auto"], "parallelism=ddp with kernels=auto"),
    (["offload=disk"], "parallelism=ddp with offload=disk"),
    (["task=dpo", "task.reference=precomputed", "task.ref_cache_dir=/tmp/x"],
     "parallelism=ddp with task.reference=precomputed"),
])
def test_what_ddp_cannot_do_yet_is_refused(overrides, says):
    with pytest.raises(ConfigError, match=says):
        validated("parallelism=ddp", *overrides)


def test_ddp_composes_with_the_rest():
    validated("parallelism=ddp", "peft=lora", "kernels=compile")


def test_launch_checks_name_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError, match="torchrun --nproc_per_node 2 -m soup.train parallelism=ddp"):
        check_launch("ddp", SINGLE)
    with pytest.raises(ConfigError, match="add parallelism=ddp"):
        check_launch("single", World(0, 2, 0))
    check_launch("single", SINGLE)
