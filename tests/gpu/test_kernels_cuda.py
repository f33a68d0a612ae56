"""CUDA-only kernel paths: liger, flash_attn, auto on a GPU, and fp8 on real float8 hardware (skipped elsewhere)."""

import copy
import importlib.util

import pytest
import torch
from omegaconf import OmegaConf

from soup.config.schema import ModelConfig
from soup.memory.kernels import apply_kernels, kernels_support
from soup.models.load import build_model
from soup.models.tokenizer import build_byte_tokenizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")


def tiny_llama(dtype="float32"):
    cfg = OmegaConf.structured(ModelConfig)
    # head_dim 32: FlashAttention wants a multiple of 8; every linear dim divisible by 16 for fp8.
    cfg.merge_with({"name": "tiny", "dtype": dtype,
                    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                             "num_attention_heads": 2, "num_key_value_heads": 1}})
    return build_model(cfg, build_byte_tokenizer(), seed=0).to(CUDA)


def batch(rows=2, seq=64):
    ids = torch.randint(5, 250, (rows, seq), generator=torch.Generator().manual_seed(0)).to(CUDA)
    return {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}


def loss_and_grads(model, b):
    loss = model(**b, use_cache=False).loss
    loss.backward()
    return loss.item(), [p.grad.float().clone() for p in model.parameters() if p.grad is not None]


def skip_unless(name):
    ok, reason = kernels_support(name, CUDA)
    if not ok:
        pytest.skip(reason)


def test_liger_patches_norms_and_mlp_and_keeps_the_loss():
    skip_unless("liger")
    reference = tiny_llama()
    model, line = apply_kernels(copy.deepcopy(reference), "liger", CUDA)
    assert "liger" in line
    assert model.model.norm._get_name() == "LigerRMSNorm"
    assert model.model.layers[0].mlp._get_name() == "LigerSwiGLUMLP"
    b = batch()
    ref_loss, ref_grads = loss_and_grads(reference, b)
    loss, grads = loss_and_grads(model, b)
    # Liger's kernels are exact up to fp32 reassociation.
    assert abs(loss - ref_loss) < 1e-4
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-4)


def test_flash_attn_switches_attention_and_keeps_the_loss():
    skip_unless("flash_attn")
    reference = tiny_llama("bfloat16")
    model, line = apply_kernels(copy.deepcopy(reference), "flash_attn", CUDA)
    assert model.config._attn_implementation == "flash_attention_2"
    b = batch()
    ref_loss, _ = loss_and_grads(reference, b)
    loss, grads = loss_and_grads(model, b)
    assert abs(loss - ref_loss) < 2e-2  # bf16 attention, different summation order
    assert all(torch.isfinite(g).all() for g in grads)


def test_auto_on_cuda_times_candidates_without_touching_grads():
    model = tiny_llama("bfloat16")
    params = list(model.parameters())
    for p in params:
        p.grad = torch.ones_like(p)
    model.train()
    out, line = apply_kernels(model, "auto", CUDA, sample_batch=batch(), autocast_dtype=torch.bfloat16)
    assert "none=" in line and "kernels: auto picked" in line
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in params)
    assert out.training
    loss = out(**batch(), use_cache=False).loss
    loss.backward()
    assert torch.isfinite(loss)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="float8 matmuls need compute capability >= 8.9")
@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="needs torchao")
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise", "rowwise_with_gw_hp"])
def test_fp8_trains_on_float8_hardware(recipe):
    from torchao.float8.float8_linear import Float8Linear

    from soup.memory.fp8 import apply_fp8

    reference = tiny_llama("bfloat16")
    model = copy.deepcopy(reference)
    line = apply_fp8(model, recipe, CUDA)
    assert "emulated" not in line
    assert isinstance(model.model.layers[0].mlp.up_proj, Float8Linear)
    b = batch()
    ref_loss, _ = loss_and_grads(reference, b)
    loss, grads = loss_and_grads(model, b)
    assert loss != ref_loss and abs(loss - ref_loss) < 0.1
    assert all(torch.isfinite(g).all() for g in grads)
