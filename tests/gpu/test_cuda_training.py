"""CUDA-only paths: run on a GPU machine (skipped elsewhere)."""

import pytest
import torch

from tests.conftest import run_cli

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_tiny_sft_trains_on_cuda(tmp_path, precision):
    run_cli("debug=tiny", "train.device=cuda", f"train.precision={precision}", f"hydra.run.dir={tmp_path}")
    assert (tmp_path / "final" / "model.safetensors").exists()
