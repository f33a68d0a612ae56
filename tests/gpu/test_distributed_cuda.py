"""Several ranks on GPUs: nccl, FSDP2's CPU offload and bf16 policy, ZeRO offload (skipped
without 2 CUDA devices). The same checks as tests/integration/test_distributed.py, which
runs them with gloo on the CPU: the ranks train like one process with the global batch."""

import importlib.util

import pytest
import torch

from tests.integration.test_distributed import BASE, train_losses, torchrun
from tests.conftest import run_in_process

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
CUDA = ["train.device=cuda"]


@pytest.mark.parametrize("parallelism, extra", [
    ("ddp", []),
    ("fsdp2", ["parallelism.cpu_offload=true"]),
    pytest.param("deepspeed_zero3", ["parallelism.offload_optimizer=true", "parallelism.offload_param=true"],
                 marks=pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="no DeepSpeed")),
])
def test_ranks_on_gpus_train_like_one_gpu(tmp_path, parallelism, extra):
    torchrun(tmp_path / "ranks", *BASE, *CUDA, *extra, "train.micro_batch_size=4", parallelism=parallelism)
    assert "(nccl)" in (tmp_path / "ranks" / "train.log").read_text()
    run_in_process(tmp_path / "one", [*BASE, *CUDA, "train.micro_batch_size=8"])
    # CUDA reductions may add in another order than one GPU does: a looser tolerance than on CPU.
    assert train_losses(tmp_path / "ranks") == pytest.approx(train_losses(tmp_path / "one"), rel=1e-3)


def test_fsdp2_bf16_policy_trains(tmp_path):
    torchrun(tmp_path / "bf16", *BASE, *CUDA, "train.precision=bf16", "train.micro_batch_size=4",
             parallelism="fsdp2")
    losses = train_losses(tmp_path / "bf16")
    assert len(losses) == 6 and losses[-1] < losses[0]
