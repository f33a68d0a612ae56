"""Activation offload and checkpointing tiers on CUDA: same results, less GPU memory (skipped elsewhere)."""

import pytest
import torch
from omegaconf import OmegaConf

from soup.config.schema import ModelConfig
from soup.memory.checkpointing import apply_checkpointing
from soup.memory.offload import ActivationOffload, wrap_model_forward
from soup.models.load import build_model
from soup.models.tokenizer import build_byte_tokenizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


def llama_on_cuda(hidden_size=32, num_layers=4):
    cfg = OmegaConf.structured(ModelConfig)
    cfg.merge_with({"name": "tiny", "tiny": {"hidden_size": hidden_size, "intermediate_size": hidden_size * 2,
                                             "num_hidden_layers": num_layers, "num_attention_heads": 4,
                                             "num_key_value_heads": 2}})
    return build_model(cfg, build_byte_tokenizer(), seed=0).to(CUDA).train()


def batch(rows=2, seq=16):
    input_ids = torch.randint(5, 250, (rows, seq), generator=torch.Generator().manual_seed(0)).to(CUDA)
    return {"input_ids": input_ids, "labels": input_ids}


def loss_and_grads(model):
    loss = model(**batch()).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def assert_same(result, reference):
    # CUDA backward of the embedding adds with atomics: the order, so the last bits, can vary.
    torch.testing.assert_close(result[0], reference[0], atol=1e-6, rtol=1e-5)
    for name, grad in result[1].items():
        torch.testing.assert_close(grad, reference[1][name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("kind", ["cpu", "disk"])
def test_offload_gives_the_loss_and_grads_of_no_offload_on_cuda(tmp_path, kind):
    reference = loss_and_grads(llama_on_cuda())
    model = llama_on_cuda()
    offload = ActivationOffload(kind, tmp_path / "scratch", tmp_path, min_bytes=0)
    wrap_model_forward(model, offload)
    result = loss_and_grads(model)
    offload.close()
    assert offload.offloaded_tensors > 0
    assert_same(result, reference)
    assert not (tmp_path / "scratch").exists()


@pytest.mark.parametrize("tier", ["selective", "medium", "full"])
def test_each_tier_gives_the_loss_and_grads_of_no_checkpointing_on_cuda(tier):
    reference = loss_and_grads(llama_on_cuda())
    model = llama_on_cuda()
    apply_checkpointing(model, tier, CUDA)
    assert_same(loss_and_grads(model), reference)


def peak_mb(model, offload=None):
    """Peak CUDA memory (MB) above what is allocated before one forward+backward of 4 x 512 tokens."""
    if offload is not None:
        wrap_model_forward(model, offload)
    inputs = batch(rows=4, seq=512)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    model(**inputs).loss.backward()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 1e6


def test_cpu_offload_and_each_tier_lower_peak_cuda_memory(tmp_path):
    peaks = {}
    for tier in ["none", "selective", "medium", "full"]:
        model = llama_on_cuda(hidden_size=256, num_layers=8)
        apply_checkpointing(model, tier, CUDA)
        peaks[tier] = peak_mb(model)
        del model
    offload = ActivationOffload("cpu", min_bytes=65536)
    peaks["cpu offload"] = peak_mb(llama_on_cuda(hidden_size=256, num_layers=8), offload)
    offload.close()
    print(peaks)
    assert peaks["selective"] < 0.95 * peaks["none"]
    assert peaks["medium"] < 0.8 * peaks["selective"]
    assert peaks["full"] < 0.6 * peaks["medium"]
    assert peaks["cpu offload"] < 0.5 * peaks["none"]
