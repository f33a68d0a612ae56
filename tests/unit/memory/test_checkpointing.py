"""Checkpointing tiers: same loss and grads as none, the right modules recomputed, less memory."""

import copy
import functools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from soup.config.schema import ModelConfig, PeftConfig
from soup.errors import ConfigError
from soup.memory import checkpointing
from soup.memory.checkpointing import (
    apply_checkpointing,
    choose_tier,
    decoder_blocks,
    estimate_activation_bytes,
    remove_checkpointing,
)
from soup.models.load import apply_peft, build_model
from soup.models.tokenizer import build_byte_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[3]
CPU = torch.device("cpu")


def tiny_llama(num_layers=4, peft=False, attention_dropout=0.1):
    cfg = OmegaConf.structured(ModelConfig)
    cfg.merge_with({"name": "tiny", "tiny": {"hidden_size": 32, "intermediate_size": 64,
                                             "num_hidden_layers": num_layers, "num_attention_heads": 2,
                                             "num_key_value_heads": 1}})
    model = build_model(cfg, build_byte_tokenizer(), seed=0)
    # Dropout inside attention: the recompute must replay the same random mask.
    for block in model.model.layers:
        block.self_attn.attention_dropout = attention_dropout
    if peft:
        peft_cfg = OmegaConf.structured(PeftConfig)
        peft_cfg.merge_with({"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj", "up_proj"]})
        model = apply_peft(model, peft_cfg, seed=0)
    return model.train()


def padded_batch():
    input_ids = torch.randint(5, 250, (2, 16), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 11:] = 0  # a padded row: the mask must reach every recomputed block
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def loss_and_grads(model, **extra):
    torch.manual_seed(123)
    loss = model(**padded_batch(), **extra).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("peft", [False, True], ids=["full-ft", "lora"])
@pytest.mark.parametrize("tier", ["selective", "medium", "full"])
def test_each_tier_gives_the_loss_and_grads_of_no_checkpointing(tier, peft):
    ref_loss, ref_grads = loss_and_grads(tiny_llama(peft=peft))
    model = tiny_llama(peft=peft)
    apply_checkpointing(model, tier, CPU)
    loss, grads = loss_and_grads(model, use_cache=True)  # a KV cache must not be written twice
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=0)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-6, rtol=0, msg=name)


def count_calls(modules):
    counts = [0] * len(modules)
    for i, module in enumerate(modules):
        # A pre-hook: the recompute stops early (torch's checkpoint early stop), once the
        # last saved tensor is rebuilt, so forward hooks after it would not run.
        module.register_forward_pre_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
    return counts


@pytest.mark.parametrize("tier, recomputed, expected_line", [
    ("full", [1, 1, 1, 1, 1, 1], "checkpointing: full (6 of 6 blocks)"),
    ("medium", [1, 0, 1, 0, 1, 0], "checkpointing: medium (3 of 6 blocks)"),
    ("selective", [1, 1, 1, 1, 1, 1], "checkpointing: selective (attention in 6 of 6 blocks)"),
    ("none", [0, 0, 0, 0, 0, 0], "checkpointing: none"),
])
def test_a_tier_recomputes_the_blocks_it_names_in_backward(tier, recomputed, expected_line):
    model = tiny_llama(num_layers=6, peft=True)  # found through peft's wrappers
    assert apply_checkpointing(model, tier, CPU) == expected_line
    blocks = decoder_blocks(model)
    # Hooks on modules inside a checkpointed region run again when backward recomputes it.
    q_proj_calls = count_calls([block.self_attn.q_proj for block in blocks])
    mlp_calls = count_calls([block.mlp for block in blocks])
    loss_and_grads(model)
    assert q_proj_calls == [1 + r for r in recomputed]
    mlp_recomputed = [0] * 6 if tier == "selective" else recomputed
    assert mlp_calls == [1 + r for r in mlp_recomputed]


def test_checkpointing_is_a_no_op_in_eval_and_under_no_grad(monkeypatch):
    calls = []
    real_checkpoint = checkpointing.checkpoint
    monkeypatch.setattr(checkpointing, "checkpoint", lambda *a, **k: calls.append(1) or real_checkpoint(*a, **k))
    model = tiny_llama()
    apply_checkpointing(model, "full", CPU)
    batch = padded_batch()
    with torch.no_grad():
        model(**batch)
    model.eval()
    model(**batch)
    assert calls == []
    model.train()
    model(**batch)
    assert len(calls) == 4


def test_remove_checkpointing_restores_the_plain_forward_and_a_second_apply_is_refused():
    model = tiny_llama()
    apply_checkpointing(model, "full", CPU)
    with pytest.raises(ValueError, match="already checkpointed"):
        apply_checkpointing(model, "medium", CPU)
    remove_checkpointing(model)
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert apply_checkpointing(model, "medium", CPU) == "checkpointing: medium (2 of 4 blocks)"


def test_a_deep_copy_of_a_checkpointed_model_recomputes_its_own_blocks():
    model = tiny_llama()
    apply_checkpointing(model, "full", CPU)
    clone = copy.deepcopy(model)
    assert all(block.forward.forward.__self__ is block for block in decoder_blocks(clone))


def test_transformers_own_checkpointing_is_refused_rather_than_doubled():
    model = tiny_llama()
    model.gradient_checkpointing_enable()
    with pytest.raises(ConfigError, match="already on"):
        apply_checkpointing(model, "full", CPU)


def test_an_unknown_tier_is_a_config_error_naming_the_choices():
    with pytest.raises(ConfigError, match="selective, medium, full"):
        apply_checkpointing(tiny_llama(), "half", CPU)


# --- auto -----------------------------------------------------------------------------

def test_activation_estimates_per_tier_match_the_documented_formulas():
    # tokens 1000, hidden 1000, 10 layers, fp32: block input I = 4e6 B, block A = 21 I = 84e6 B.
    args = (1000, 1000, 10, 4)
    assert estimate_activation_bytes("none", *args) == 840_000_000
    assert estimate_activation_bytes("selective", *args) == 714_000_000  # 0.85 x none
    assert estimate_activation_bytes("medium", *args) == 5 * 4_000_000 + 5 * 84_000_000 + 84_000_000
    assert estimate_activation_bytes("full", *args) == 10 * 4_000_000 + 84_000_000


@pytest.mark.parametrize("total_memory_bytes, tier", [
    (1_250_000_000, "none"),       # budget 1000 MB >= 100 + 840
    (1_100_000_000, "selective"),  # budget 880 MB: none 940 no, selective 814 yes
    (1_000_000_000, "medium"),     # budget 800 MB: selective 814 no, medium 624 yes
    (500_000_000, "full"),         # budget 400 MB: medium no, full 224 yes
    (200_000_000, "full"),         # budget 160 MB: nothing fits, full keeps the least
])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_auto_takes_the_cheapest_tier_whose_estimate_fits_80_percent_of_memory(total_memory_bytes, tier, device):
    chosen, reason = choose_tier(torch.device(device), total_memory_bytes, model_state_bytes=100_000_000,
                                 tokens_per_micro_batch=1000, hidden_size=1000, num_layers=10)
    assert chosen == tier
    assert f"{device} memory" in reason
    if total_memory_bytes == 200_000_000:
        assert "exceeds" in reason


def test_apply_checkpointing_auto_reports_the_tier_it_picked():
    line = apply_checkpointing(tiny_llama(), "auto", CPU, total_memory_bytes=10**12, tokens_per_micro_batch=32)
    assert line.startswith("checkpointing: auto -> none; estimated peak")
    model = tiny_llama()
    line = apply_checkpointing(model, "auto", CPU, total_memory_bytes=1, tokens_per_micro_batch=32)
    assert line.startswith("checkpointing: auto -> full (4 of 4 blocks); estimated peak")
    with pytest.raises(ValueError, match="tokens_per_micro_batch"):
        apply_checkpointing(tiny_llama(), "auto", CPU)


# --- peak memory ----------------------------------------------------------------------

PEAK_CHILD = r'''
import gc, json, re, sys
from pathlib import Path
import torch
from omegaconf import OmegaConf
from soup.config.schema import ModelConfig
from soup.memory.checkpointing import apply_checkpointing
from soup.memory.offload import ActivationOffload, wrap_model_forward
from soup.models.load import build_model
from soup.models.tokenizer import build_byte_tokenizer

def proc_status_bytes(field):
    return int(re.search(field + r":\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024

# Activations dominate: ~22 MB a block for 4 x 512 tokens at hidden 128 (fp32), weights ~7 MB in all.
cfg = OmegaConf.structured(ModelConfig)
cfg.merge_with({"name": "tiny", "tiny": {"hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 8,
                                         "num_attention_heads": 4, "num_key_value_heads": 2}})
tokenizer = build_byte_tokenizer()
input_ids = torch.randint(5, 250, (4, 512), generator=torch.Generator().manual_seed(0))
run_dir = Path(sys.argv[1])
peaks_mb = {}
for setting in ["warmup"] + sys.argv[2:]:  # a small first pass pays the one-off allocations
    model = build_model(cfg, tokenizer, seed=0).train()
    offload = None
    if setting == "disk":
        offload = ActivationOffload("disk", run_dir / "scratch", run_dir, min_bytes=65536)
        wrap_model_forward(model, offload)
    else:
        apply_checkpointing(model, "none" if setting == "warmup" else setting, torch.device("cpu"))
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    before = proc_status_bytes("VmRSS")
    batch = input_ids[:1, :64] if setting == "warmup" else input_ids
    model(input_ids=batch, labels=batch).loss.backward()
    peaks_mb[setting] = (proc_status_bytes("VmHWM") - before) / 1e6
    if offload is not None:
        offload.close()
    del model
    gc.collect()
print(json.dumps(peaks_mb))
'''


@functools.cache
def measured_peak_mb() -> dict[str, float]:
    """Peak RSS growth (MB) of one forward+backward per setting, in one fresh process.

    Settings: each checkpoint tier, and "disk" (disk offload, no checkpointing); cached
    so the offload tests share the run. The peak is Linux's VmHWM, reset to the current
    RSS through /proc/self/clear_refs before each pass; MALLOC_MMAP_THRESHOLD_ makes
    glibc return freed tensors to the OS, so one pass's freed memory does not pad the
    next one's RSS. "scratch_left" says whether the disk scratch dir outlived close().
    """
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("peak-RSS measurement needs Linux /proc/self/clear_refs")
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    with tempfile.TemporaryDirectory() as run_dir:
        proc = subprocess.run([sys.executable, "-c", PEAK_CHILD, run_dir, "none", "selective", "medium", "full", "disk"],
                              env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        peaks = json.loads(proc.stdout.strip().splitlines()[-1])
        peaks["scratch_left"] = (Path(run_dir) / "scratch").exists()
    print(peaks)
    return peaks


@pytest.mark.slow
def test_each_tier_lowers_peak_memory_of_forward_and_backward():
    peak = measured_peak_mb()
    # Measured ~177 / 150 / 97 / 35 MB. none keeps ~21 hidden-sized tensors per token per
    # block; selective drops attention's ~3; medium keeps 4 of 8 blocks; full keeps block inputs
    # plus one block during its recompute.
    assert peak["none"] > 120
    assert peak["selective"] < 0.93 * peak["none"]
    assert peak["medium"] < 0.8 * peak["selective"]
    assert peak["full"] < 0.6 * peak["medium"]
