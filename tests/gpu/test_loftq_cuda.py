"""LoftQ's init runs on CUDA only (peft quantises the base there)."""

import pytest
import torch

from tests.conftest import run_cli

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_loftq_trains_and_saves_its_modified_base(tmp_path):
    run_cli("debug=tiny", "peft=loftq", "train.device=cuda", f"hydra.run.dir={tmp_path}")
    assert (tmp_path / "final" / "adapter_model.safetensors").exists()
    assert (tmp_path / "final" / "base_model" / "model.safetensors").exists()
