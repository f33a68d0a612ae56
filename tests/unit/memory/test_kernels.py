"""Kernel options on CPU: support checks say why not, auto times forward-only and undoes what it tried."""

import copy
import math

import pytest
import torch
from omegaconf import OmegaConf
from transformers.models.llama import modeling_llama

from soup.config.schema import ModelConfig
from soup.errors import ConfigError
from soup.memory import kernels
from soup.memory.kernels import (
    apply_kernels,
    auto_candidates,
    choose_kernels,
    kernels_support,
    pick_fastest,
)
from soup.models.load import build_model
from soup.models.tokenizer import build_byte_tokenizer

CPU = torch.device("cpu")
CUDA = torch.device("cuda")


def tiny_llama(num_layers=1):
    cfg = OmegaConf.structured(ModelConfig)
    cfg.merge_with({"name": "tiny", "tiny": {"hidden_size": 32, "intermediate_size": 64,
                                             "num_hidden_layers": num_layers, "num_attention_heads": 2,
                                             "num_key_value_heads": 1}})
    return build_model(cfg, build_byte_tokenizer(), seed=0)


def sample_batch(rows=3, seq=300):
    ids = torch.randint(5, 250, (rows, seq), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def fake_compile(model, device):
    """Stands in for the compile part: dynamo without codegen, seconds instead of a minute on CPU."""
    model.compile(backend="eager")
    return "compile (eager backend, test)"


# --- support checks ------------------------------------------------------------------------


def test_liger_is_unsupported_on_cpu_with_a_reason():
    ok, reason = kernels_support("liger", CPU)
    assert not ok and "CUDA" in reason


def test_liger_on_cuda_without_the_package_names_the_install(monkeypatch):
    monkeypatch.setattr(kernels, "_installed", lambda module: module != "liger_kernel")
    ok, reason = kernels_support("liger", CUDA)
    assert not ok and "pip install" in reason and "liger-kernel" in reason


def test_flash_attn_is_unsupported_on_cpu_and_on_pre_ampere_gpus(monkeypatch):
    ok, reason = kernels_support("flash_attn", CPU)
    assert not ok and "CUDA" in reason
    monkeypatch.setattr(kernels, "_installed", lambda module: True)
    monkeypatch.setattr(kernels, "_cuda_capability", lambda device: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Test T4")
    ok, reason = kernels_support("flash_attn", CUDA)
    assert not ok and "7.5" in reason and "8.0" in reason
    monkeypatch.setattr(kernels, "_cuda_capability", lambda device: (9, 0))
    assert kernels_support("flash_attn", CUDA) == (True, "")


def test_none_compile_and_auto_are_supported_on_cpu():
    assert kernels_support("none", CPU)[0]
    assert kernels_support("compile", CPU)[0]
    assert kernels_support("auto", CPU)[0]
    assert not kernels_support("triton_magic", CPU)[0]


def test_applying_an_unsupported_kernel_fails_with_the_reason():
    with pytest.raises(ConfigError, match="kernels=liger: .*CUDA"):
        apply_kernels(tiny_llama(), "liger", CPU)
    with pytest.raises(ConfigError, match="kernels=flash_attn"):
        apply_kernels(tiny_llama(), "flash_attn", CPU)


def test_none_returns_the_same_model_unchanged():
    model = tiny_llama()
    out, line = apply_kernels(model, "none", CPU)
    assert out is model and "none" in line and model._compiled_call_impl is None


# --- auto ---------------------------------------------------------------------------------


def test_auto_candidates_on_cpu_are_baseline_then_compile():
    assert auto_candidates(CPU) == [(), ("compile",)]


def test_auto_candidates_on_cuda_are_every_supported_combination(monkeypatch):
    monkeypatch.setattr(kernels, "kernels_support", lambda name, device: (True, ""))
    candidates = auto_candidates(CUDA)
    assert candidates[0] == () and len(candidates) == 8
    assert ("liger", "flash_attn", "compile") in candidates


def test_auto_never_times_flash_attn_on_a_batch_with_a_4d_mask(monkeypatch):
    # Packing's cross-document mask and the shared-prompt preference layout carry a 4-D
    # mask that flash attention cannot take; auto must not even try it.
    monkeypatch.setattr(kernels, "auto_candidates", lambda device: [(), ("flash_attn",)])
    batch = sample_batch(rows=2, seq=16)
    batch["attention_mask"] = torch.ones(2, 1, 16, 16, dtype=torch.bool).tril()
    assert set(choose_kernels(tiny_llama(), CPU, batch).results) == {"none"}
    batch["attention_mask"] = torch.ones(2, 16, dtype=torch.long)
    assert set(choose_kernels(tiny_llama(), CPU, batch).results) == {"none", "flash_attn"}


def test_ties_go_to_the_simpler_candidate_and_clear_wins_to_the_faster():
    order = ["none", "compile"]
    assert pick_fastest({"none": 10.0, "compile": 9.9}, order) == "none"
    assert pick_fastest({"none": 10.0, "compile": 8.0}, order) == "compile"
    assert pick_fastest({"none": "failed (RuntimeError: x)", "compile": 8.0}, order) == "compile"


@pytest.mark.parametrize("bad", [math.nan, math.inf, -1.0])
def test_a_non_finite_time_is_never_picked(bad):
    assert pick_fastest({"none": 10.0, "compile": bad}, ["none", "compile"]) == "none"
    with pytest.raises(RuntimeError, match="no candidate"):
        pick_fastest({"none": bad, "compile": bad}, ["none", "compile"])


def test_auto_on_cpu_returns_the_model_and_a_line_with_every_timing(monkeypatch):
    monkeypatch.setitem(kernels._APPLY, "compile", fake_compile)
    model = tiny_llama()
    out, line = apply_kernels(model, "auto", CPU, sample_batch=sample_batch())
    assert out is model
    assert "kernels: auto picked" in line and "2x256 tokens" in line
    assert "none=" in line and "compile=" in line
    # Each candidate's entry is a time in ms.
    for name in ("none", "compile"):
        assert float(line.split(f"{name}=")[1].split(",")[0]) >= 0


def test_auto_skips_a_candidate_that_raises(monkeypatch):
    def broken(model, device):
        raise RuntimeError("boom")

    monkeypatch.setitem(kernels._APPLY, "compile", broken)
    model = tiny_llama()
    out, line = apply_kernels(model, "auto", CPU)
    assert "compile=failed (RuntimeError: boom)" in line
    assert "picked none" in line and out._compiled_call_impl is None


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_auto_never_adopts_a_candidate_with_a_non_finite_time(monkeypatch, bad):
    def mark(model, device):
        model.fake_compiled = True
        return "compile (marked, test)"

    # The marked model "runs" 100x faster, but its time is not finite.
    def timer(model, batch, device):
        return bad if getattr(model, "fake_compiled", False) else 5.0

    monkeypatch.setitem(kernels._APPLY, "compile", mark)
    monkeypatch.setattr(kernels, "_forward_ms", timer)
    model = tiny_llama()
    out, line = apply_kernels(model, "auto", CPU)
    assert "picked none" in line and f"compile=skipped (time {bad})" in line
    assert not hasattr(out, "fake_compiled")


def test_auto_adopts_a_clearly_faster_candidate(monkeypatch):
    def mark(model, device):
        model.fake_compiled = True
        return "compile (marked, test)"

    monkeypatch.setitem(kernels._APPLY, "compile", mark)
    monkeypatch.setattr(kernels, "_forward_ms", lambda model, batch, device: 1.0 if hasattr(model, "fake_compiled") else 5.0)
    model = tiny_llama()
    out, line = apply_kernels(model, "auto", CPU)
    assert "picked compile (marked, test)" in line and out.fake_compiled


def test_auto_creates_no_grads_changes_none_and_restores_training_mode(monkeypatch):
    monkeypatch.setitem(kernels._APPLY, "compile", fake_compile)
    model = tiny_llama()
    model.train()
    model.model.layers[0].mlp.eval()  # a mixed state must come back exactly
    params = list(model.parameters())
    for p in params[::2]:
        p.grad = torch.randn_like(p)
    grads = [None if p.grad is None else p.grad.clone() for p in params]
    modes = {name: m.training for name, m in model.named_modules()}
    rng = torch.get_rng_state()

    apply_kernels(model, "auto", CPU)

    for p, g in zip(params, grads):
        assert (p.grad is None) if g is None else torch.equal(p.grad, g)
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert torch.equal(torch.get_rng_state(), rng)


def test_a_candidate_that_is_not_adopted_leaves_no_trace(monkeypatch):
    """Liger-style patches (instance forwards, modeling-module globals, the attention config) are undone."""
    original_rope = modeling_llama.apply_rotary_pos_emb
    # Registered with monkeypatch so a failure here cannot leak the fake RoPE into other tests.
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", original_rope)

    def liger_like(model, device):
        norm = model.model.norm
        norm.forward = lambda hidden: hidden * 0
        norm.casting_mode = "llama"
        modeling_llama.apply_rotary_pos_emb = lambda q, k, cos, sin, unsqueeze_dim=1: (q, k)
        model.set_attn_implementation("eager")
        model.compile(backend="eager")
        return "liger-like (test)"

    monkeypatch.setitem(kernels._APPLY, "liger", liger_like)
    monkeypatch.setattr(kernels, "_forward_ms",
                        lambda model, batch, device: 9.0 if "forward" in vars(model.model.norm) else 5.0)
    model = tiny_llama()
    ids = sample_batch(1, 16)["input_ids"]
    before = logits(model, ids)

    choice = choose_kernels(model, CPU, candidates=[(), ("liger",)])

    assert choice.parts == () and choice.results["liger"] == 9.0
    assert modeling_llama.apply_rotary_pos_emb is original_rope
    assert "forward" not in vars(model.model.norm) and not hasattr(model.model.norm, "casting_mode")
    assert model.config._attn_implementation == "sdpa"
    assert model._compiled_call_impl is None
    assert torch.equal(logits(model, ids), before)


def test_the_benchmark_batch_is_truncated_to_two_rows_of_256_tokens():
    b = sample_batch(rows=3, seq=300)
    b["position_ids"] = torch.arange(300).repeat(3, 1)
    b["attention_mask"] = torch.ones(3, 1, 300, 300)
    got = kernels._benchmark_batch(tiny_llama(), b, CPU)
    assert set(got) == {"input_ids", "attention_mask", "position_ids"}  # labels are the loss's
    assert got["input_ids"].shape == (2, 256) and got["position_ids"].shape == (2, 256)
    assert got["attention_mask"].shape == (2, 1, 256, 256)
    small = kernels._benchmark_batch(tiny_llama(), sample_batch(rows=1, seq=40), CPU)
    assert small["input_ids"].shape == (1, 40)


# --- compile ------------------------------------------------------------------------------


@pytest.mark.slow
def test_compiled_model_matches_eager_and_trains_a_step():
    eager = tiny_llama()
    compiled, line = apply_kernels(copy.deepcopy(eager), "compile", CPU)
    assert "compile" in line and compiled._compiled_call_impl is not None
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints unaffected
    ids = sample_batch(2, 32)["input_ids"]
    losses, grads = [], []
    for model in (eager, compiled):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        losses.append(loss.item())
        grads.append([p.grad.clone() for p in model.parameters()])
        torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert abs(losses[0] - losses[1]) < 1e-5
    for g_eager, g_compiled in zip(*grads):
        torch.testing.assert_close(g_compiled, g_eager, rtol=1e-4, atol=1e-5)
    for p_eager, p_compiled in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(p_compiled, p_eager, rtol=1e-4, atol=1e-5)


def _auto_on_rank(rank: int, init_file: str, picks: dict) -> None:
    """One rank of a 2-process gloo group whose own timing would pick differently from rank 0's."""
    import torch.distributed as dist

    import soup.memory.kernels as kernels

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        own = ("compile",) if rank == 1 else ()
        kernels.choose_kernels = lambda *a, **k: kernels.AutoChoice(own, {"none": 1.0, "compile": 1.0}, 1, 1)
        _, line = kernels.apply_kernels(torch.nn.Linear(2, 2), "auto", torch.device("cpu"))
        picks[rank] = line
    finally:
        dist.destroy_process_group()


def test_every_rank_takes_rank_0s_auto_pick(tmp_path):
    """kernels=auto under several ranks: each times the candidates, all apply rank 0's pick
    (ranks compiled differently would run different programs on one model)."""
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        picks = manager.dict()
        # fork: the ranks start in a moment instead of importing the test module again
        mp.start_processes(_auto_on_rank, args=(str(tmp_path / "rendezvous"), picks), nprocs=2, start_method="fork")
        assert picks[0] == picks[1] == "kernels: auto picked none (stock modules); " + \
            "forward ms (median of 5, 1x1 tokens, no grad): none=1.00, compile=1.00"
