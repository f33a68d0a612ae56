"""Chunked linear cross-entropy: the loss and gradients of the full-logits loss, at a fraction of the memory."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from soup.memory.chunked_ce import (
    ChunkedLinearCrossEntropy,
    cce_linear_cross_entropy,
    cut_cross_entropy_available,
    linear_cross_entropy,
)

REPO_ROOT = Path(__file__).resolve().parents[3]
EXACT = dict(atol=1e-5, rtol=1e-5)


def make_inputs(n=13, vocab=50, hidden_size=8, dtype=torch.float32, bias=True, ignored=(2, 3, 9), seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, hidden_size, generator=gen).to(dtype).requires_grad_()
    weight = torch.randn(vocab, hidden_size, generator=gen).to(dtype).requires_grad_()
    head_bias = torch.randn(vocab, generator=gen).to(dtype).requires_grad_() if bias else None
    targets = torch.randint(0, vocab, (n,), generator=gen)
    targets[list(ignored)] = -100
    return hidden, weight, head_bias, targets


def leaves(hidden, weight, bias):
    return [t for t in (hidden, weight, bias) if t is not None]


def grads_of(loss, tensors):
    """Gradients of loss w.r.t. each tensor that requires grad (None for the others)."""
    wanted = [t for t in tensors if t is not None and t.requires_grad]
    found = iter(torch.autograd.grad(loss, wanted))
    return [next(found) if t is not None and t.requires_grad else None for t in tensors]


def plain_loss(hidden, weight, targets, bias=None, softcap=None):
    """The reference: full fp32 logits and F.cross_entropy(reduction="sum")."""
    logits = F.linear(hidden, weight, bias).float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")


def test_matches_a_hand_computed_loss_and_gradient():
    # logits = [0, 0, ln 3]: softmax = [1/5, 1/5, 3/5]; target 2 -> loss = ln(5/3);
    # d loss / d hidden = sum_v (p_v - [v == 2]) w_v = (3/5 - 1) ln 3.
    hidden = torch.tensor([[1.0]], requires_grad=True)
    weight = torch.tensor([[0.0], [0.0], [math.log(3)]])
    loss, n = linear_cross_entropy(hidden, weight, torch.tensor([2]))
    loss.backward()
    assert n == 1
    torch.testing.assert_close(loss, torch.tensor(math.log(5 / 3)), **EXACT)
    torch.testing.assert_close(hidden.grad, torch.tensor([[-0.4 * math.log(3)]]), **EXACT)


@pytest.mark.parametrize("chunk_size", [1, 4, 5, 13, 64])  # 5 does not divide the 10 kept rows; 64 > N
def test_loss_and_grads_equal_full_logits_cross_entropy(chunk_size):
    hidden, weight, bias, targets = make_inputs()
    loss, n = linear_cross_entropy(hidden, weight, targets, bias=bias, chunk_size=chunk_size)
    ref = plain_loss(hidden, weight, targets, bias)
    assert n == 10 and loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss, ref, **EXACT)
    for got, want in zip(grads_of(loss, leaves(hidden, weight, bias)), grads_of(ref, leaves(hidden, weight, bias))):
        torch.testing.assert_close(got, want, **EXACT)


def test_the_autograd_function_itself_gives_ignored_rows_zero_loss_and_zero_grad():
    hidden, weight, bias, targets = make_inputs()
    loss = ChunkedLinearCrossEntropy.apply(hidden, weight, bias, targets, 4, -100, None)
    ref = plain_loss(hidden, weight, targets, bias)
    torch.testing.assert_close(loss, ref, **EXACT)
    got, want = grads_of(loss, leaves(hidden, weight, bias)), grads_of(ref, leaves(hidden, weight, bias))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **EXACT)
    assert torch.count_nonzero(got[0][[2, 3, 9]]) == 0


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_float64_gradcheck(softcap):
    hidden, weight, bias, targets = make_inputs(n=5, vocab=7, hidden_size=3, dtype=torch.float64, ignored=(1,))

    def loss_fn(h, w, b):
        loss, _ = linear_cross_entropy(h, w, targets, bias=b, chunk_size=2, softcap=softcap)
        assert loss.dtype == torch.float64  # fp64 inputs keep fp64 sums, or finite differences drown
        return loss

    assert torch.autograd.gradcheck(loss_fn, (hidden, weight, bias), eps=1e-6, atol=1e-4)


def test_softcap_matches_tanh_capped_full_logits():
    hidden, weight, bias, targets = make_inputs()
    hidden.data *= 3  # logits well into tanh's curved part
    loss, _ = linear_cross_entropy(hidden, weight, targets, bias=bias, chunk_size=4, softcap=5.0)
    ref = plain_loss(hidden, weight, targets, bias, softcap=5.0)
    torch.testing.assert_close(loss, ref, **EXACT)
    assert not torch.allclose(ref, plain_loss(hidden, weight, targets, bias), rtol=1e-2)  # the cap matters
    for got, want in zip(grads_of(loss, leaves(hidden, weight, bias)), grads_of(ref, leaves(hidden, weight, bias))):
        torch.testing.assert_close(got, want, **EXACT)


def test_bf16_inputs_are_close_to_the_fp32_reference_and_keep_their_dtype():
    hidden, weight, bias, targets = make_inputs(n=64, vocab=256, hidden_size=32, dtype=torch.bfloat16, ignored=(0,))
    loss, _ = linear_cross_entropy(hidden, weight, targets, bias=bias, chunk_size=24)
    grads = grads_of(loss, leaves(hidden, weight, bias))
    ref_inputs = [t.detach().float().requires_grad_() for t in (hidden, weight, bias)]
    ref = plain_loss(ref_inputs[0], ref_inputs[1], targets, ref_inputs[2])
    ref_grads = torch.autograd.grad(ref, ref_inputs)
    assert loss.dtype == torch.float32
    # bf16 logits carry ~3 significant digits; per-element gradients are softmax - onehot times bf16 values.
    torch.testing.assert_close(loss, ref, atol=0.0, rtol=2e-2)
    for got, want in zip(grads, ref_grads):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want, atol=5e-2, rtol=5e-2)


def ops_in_backward(loss) -> list[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        loss.backward()
    return [event.key for event in prof.key_averages()]


def test_frozen_head_gets_no_gradient_and_no_gradient_work():
    hidden, weight, bias, targets = make_inputs()
    weight.requires_grad_(False)
    bias.requires_grad_(False)
    loss, _ = linear_cross_entropy(hidden, weight, targets, bias=bias, chunk_size=4)
    (want,) = grads_of(plain_loss(hidden, weight, targets, bias), [hidden])
    ops = ops_in_backward(loss)
    torch.testing.assert_close(hidden.grad, want, **EXACT)
    assert weight.grad is None and bias.grad is None
    assert "aten::addmm_" not in ops  # the [V, H] weight-gradient accumulation never ran
    hidden, weight, bias, targets = make_inputs()
    assert "aten::addmm_" in ops_in_backward(linear_cross_entropy(hidden, weight, targets, bias=bias)[0])


def test_hidden_that_requires_no_grad_still_trains_the_head():
    hidden, weight, bias, targets = make_inputs()
    hidden.requires_grad_(False)
    loss, _ = linear_cross_entropy(hidden, weight, targets, bias=bias, chunk_size=3)
    ref = plain_loss(hidden, weight, targets, bias)
    for got, want in zip(grads_of(loss, [hidden, weight, bias]), grads_of(ref, [hidden, weight, bias])):
        torch.testing.assert_close(got, want, **EXACT)


def test_all_ignored_targets_give_zero_loss_zero_count_and_zero_grads():
    hidden, weight, bias, targets = make_inputs(n=4, ignored=(0, 1, 2, 3))
    loss, n = linear_cross_entropy(hidden, weight, targets, bias=bias, chunk_size=2)
    loss.backward()
    assert n == 0
    assert loss.item() == 0.0
    for tensor in (hidden, weight, bias):
        assert tensor.grad is not None and torch.count_nonzero(tensor.grad) == 0


def test_autocast_runs_the_head_in_the_autocast_dtype_and_returns_fp32_grads():
    hidden, weight, bias, targets = make_inputs(n=32, vocab=128, hidden_size=16, ignored=(5,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = linear_cross_entropy(hidden, weight, targets, bias=bias, chunk_size=10)
        ref = plain_loss(hidden, weight, targets, bias)  # F.linear autocasts to bf16 too
    torch.testing.assert_close(loss, ref, atol=0.0, rtol=1e-2)
    for got, want in zip(grads_of(loss, leaves(hidden, weight, bias)), grads_of(ref, leaves(hidden, weight, bias))):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)


def test_bad_inputs_are_refused_with_the_expected_shape():
    hidden, weight, bias, targets = make_inputs()
    with pytest.raises(ValueError, match=r"targets must be \[N\] = \[13\]"):
        linear_cross_entropy(hidden, weight, targets[:5])
    with pytest.raises(ValueError, match="weight \\[V, H\\]"):
        linear_cross_entropy(hidden, weight.T, targets)
    with pytest.raises(ValueError, match="chunk_size must be positive"):
        linear_cross_entropy(hidden, weight, targets, chunk_size=0)
    with pytest.raises(ValueError, match="share a dtype"):
        linear_cross_entropy(hidden.bfloat16(), weight, targets)


# --- the cut-cross-entropy package ------------------------------------------------------

@pytest.mark.skipif(not cut_cross_entropy_available(), reason="cut-cross-entropy is not installed (extra 'cce')")
@pytest.mark.parametrize("softcap", [None, 4.0])
def test_cut_cross_entropy_package_agrees_with_ours(softcap):
    hidden, weight, bias, targets = make_inputs()
    got, n = cce_linear_cross_entropy(hidden, weight, targets, bias=bias, softcap=softcap)
    want, n_ours = linear_cross_entropy(hidden, weight, targets, bias=bias, softcap=softcap, chunk_size=4)
    assert n == n_ours == 10
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    for g, w in zip(grads_of(got, leaves(hidden, weight, bias)), grads_of(want, leaves(hidden, weight, bias))):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(cut_cross_entropy_available(), reason="cut-cross-entropy is installed")
def test_cce_without_the_package_names_the_extra_to_install():
    from soup.errors import MissingDependency

    hidden, weight, _, targets = make_inputs()
    with pytest.raises(MissingDependency, match=r"soup-harness\[cce\]"):
        cce_linear_cross_entropy(hidden, weight, targets)


# --- peak memory ------------------------------------------------------------------------

PEAK_CHILD = r'''
import gc, json, re
from pathlib import Path
import torch
import torch.nn.functional as F
from soup.memory.chunked_ce import linear_cross_entropy

def status_bytes(field):
    return int(re.search(field + r":\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024

def inputs(n, vocab, hidden_size):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, hidden_size, generator=gen).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=gen) * 0.02).requires_grad_()
    return hidden, weight, torch.randint(0, vocab, (n,), generator=gen)

def plain(hidden, weight, targets):
    F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum").backward()

def chunked(hidden, weight, targets):
    linear_cross_entropy(hidden, weight, targets, chunk_size=64)[0].backward()

small = inputs(128, 1024, 64)  # a small first pass of each pays the one-off allocations
plain(*small), chunked(*small)
peaks_mb = {}
for step in (plain, chunked):
    args = inputs(1024, 32768, 64)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    before = status_bytes("VmRSS")
    step(*args)
    peaks_mb[step.__name__] = (status_bytes("VmHWM") - before) / 1e6
    del args
print(json.dumps(peaks_mb))
'''


@pytest.mark.slow
def test_chunked_loss_and_backward_peak_at_least_4x_below_full_logits():
    """Peak RSS growth of loss + backward, N=1024 tokens, V=32768, H=64, fp32, in a fresh process.

    Full logits are 128 MiB; F.cross_entropy keeps its log-softmax and backward makes a
    gradient for each, so the plain peak is several of those. Chunked at 64 rows keeps
    [64, V] buffers (8 MiB each) plus the 8 MiB weight gradient that both variants pay.
    MALLOC_MMAP_THRESHOLD_ makes glibc give freed tensors back to the OS so that one
    pass's freed memory does not hide the next one's growth.
    """
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("peak-RSS measurement needs Linux /proc/self/clear_refs")
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run([sys.executable, "-c", PEAK_CHILD], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    peak = json.loads(proc.stdout.strip().splitlines()[-1])
    print(peak)
    assert peak["plain"] > 2 * 134  # at least the logits and their log-softmax: the measurement sees torch
    assert peak["chunked"] * 4 <= peak["plain"]
