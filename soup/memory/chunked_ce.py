"""Linear cross-entropy that never holds the [tokens x vocab] logits.

Why: the LM head's logits dominate a fine-tuning step's memory at large vocabularies.
At vocab V = 128k and N = 4096 labelled tokens, fp32 logits are N x V x 4 B = 2 GiB;
F.cross_entropy keeps its log-softmax (another 2 GiB) for backward, and backward
allocates the gradient of each (2 GiB more, at times two at once). The loss here owns
the head instead (as torchtune's LinearCrossEntropyLoss and Wijmans et al. 2024, "Cut
Your Losses in Large-Vocabulary Language Models", https://arxiv.org/abs/2411.09009,
do): it takes the hidden states and the head weight, and runs the head on `chunk_size`
rows at a time.

Forward, for each chunk of rows (z = logits of the chunk, in fp32):

    zraw   = h W^T + b                       [chunk, V]   (matmul in the input dtype)
    z      = s * tanh(zraw / s)              (optional Gemma-style softcap s; else z = zraw)
    lse_i  = log sum_v exp(z_iv)             kept: [N] fp32
    loss  += sum_i (lse_i - z_{i, y_i})      over rows whose target is not ignored

Backward recomputes each chunk's z (one more head matmul, the price of the memory):

    dL/dz_iv   = g * (softmax(z_i)_v - [v == y_i])       g = grad of the loss sum; 0 for ignored rows
    dL/dzraw   = dL/dz * (1 - tanh(zraw / s)^2)          only with a softcap
    dL/dh      = dL/dzraw W                              [chunk, H], written per chunk
    dL/dW     += dL/dzraw^T h                            [V, H], fp32 accumulator
    dL/db     += sum_i dL/dzraw_i                        [V], fp32 accumulator

Memory beyond the inputs and their gradients, O(chunk_size x V) and independent of N:
the [N] logsumexp; one [chunk, V] fp32 buffer reused by every chunk (two in backward with
a softcap, for tanh), plus one [chunk, V] input-dtype buffer when the inputs are bf16/fp16;
and, for bf16/fp16 with a trainable head, an fp32 [V, H] dL/dW accumulator and a [V, H]
scratch. Pick chunk_size so chunk_size x V x 4 B is small: at V = 128k, 256 rows is 128 MiB,
while the default 4096 rows is 2 GiB (at N <= 4096 that saves only the log-softmax and
gradient tensors F.cross_entropy would add). Gradient work for a head that requires no
grad (a frozen head under LoRA) or hidden states that require none is skipped.
Measured by scripts/bench/memory_ce.py (V = 128256, N = 4096, H = 256, fp32, CPU): loss +
backward peak 6311 MB with full logits, 273 MB at chunk_size=256 (23x less).

`cce_linear_cross_entropy` gives the same (loss_sum, n_targets) contract through Apple's
cut-cross-entropy package, whose Triton kernel also never writes the logits to memory.
"""

from __future__ import annotations

import importlib.util

import torch
from torch.autograd.function import once_differentiable

from soup.errors import require
from soup.losses.sft import IGNORE_INDEX


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Sum over non-ignored rows of -log softmax(hidden @ weight.T + bias)[target], row chunk by row chunk.

    forward(hidden [N, H], weight [V, H], bias [V] | None, targets [N] long, chunk_size: int,
            ignore_index: int, softcap: float | None) -> loss_sum: scalar fp32.
    hidden, weight and bias share one dtype (fp32 or bf16/fp16); the matmuls run in it, the
    softmax and every sum in fp32 (fp64 for fp64 inputs, so gradcheck works). Gradients come
    back in the inputs' dtypes. Call through `linear_cross_entropy`, which also checks
    shapes and drops ignored rows first.

    Each pass allocates its [chunk, V] buffers once and reuses them for every chunk: a
    fresh 100 MB tensor a chunk costs page faults on CPU (glibc mmaps allocations that
    large) and allocator churn on GPU.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, ignore_index, softcap):
        n_rows, acc_dtype = hidden.shape[0], _accumulation_dtype(hidden.dtype)
        lse = torch.empty(n_rows, dtype=acc_dtype, device=hidden.device)
        loss_sum = torch.zeros((), dtype=acc_dtype, device=hidden.device)
        logits_buffer, low_buffer = _chunk_buffers(min(chunk_size, n_rows), weight, acc_dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, n_rows, chunk_size):
                rows = slice(start, start + chunk_size)
                hidden_chunk, targets_chunk = hidden[rows], targets[rows]
                logits = _head_into(logits_buffer, low_buffer, hidden_chunk, weight, bias)
                if softcap:
                    logits.div_(softcap).tanh_().mul_(softcap)
                keep = targets_chunk != ignore_index
                target_logit = logits.gather(1, torch.where(keep, targets_chunk, 0).unsqueeze(1)).squeeze(1)
                # logsumexp in place (max-shifted), so the chunk needs no second [chunk, V] buffer
                row_max = logits.amax(dim=1, keepdim=True)
                lse[rows] = logits.sub_(row_max).exp_().sum(dim=1).log_().add_(row_max.squeeze(1))
                loss_sum += torch.where(keep, lse[rows] - target_logit, 0.0).sum()
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk_size, ctx.ignore_index, ctx.softcap = chunk_size, ignore_index, softcap
        return loss_sum

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        want_hidden, want_weight, want_bias = ctx.needs_input_grad[:3]
        chunk_size, softcap, dtype, acc_dtype = ctx.chunk_size, ctx.softcap, hidden.dtype, lse.dtype
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        # dW and db accumulate in fp32 over chunks; a low-precision dW chunk product lands in a
        # reused [V, H] scratch first (CPU has no bf16 x bf16 -> fp32 addmm).
        grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if want_weight else None
        grad_weight_chunk = torch.empty_like(weight) if want_weight and dtype != acc_dtype else None
        grad_bias = torch.zeros(bias.shape, dtype=acc_dtype, device=bias.device) if want_bias else None
        probs_buffer, low_buffer = _chunk_buffers(min(chunk_size, hidden.shape[0]), weight, acc_dtype)
        tanh_buffer = torch.empty_like(probs_buffer) if softcap else None
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk_size):
                rows = slice(start, start + chunk_size)
                hidden_chunk, targets_chunk = hidden[rows], targets[rows]
                n_chunk = hidden_chunk.shape[0]
                grad_logits = _head_into(probs_buffer, low_buffer, hidden_chunk, weight, bias)
                if softcap:
                    tanh = torch.div(grad_logits, softcap, out=tanh_buffer[:n_chunk]).tanh_()
                    torch.mul(tanh, softcap, out=grad_logits)
                grad_logits.sub_(lse[rows].unsqueeze(1)).exp_()  # softmax, from the saved logsumexp
                keep = targets_chunk != ctx.ignore_index
                row_index = torch.arange(n_chunk, device=grad_logits.device)
                grad_logits[row_index, torch.where(keep, targets_chunk, 0)] -= 1.0
                grad_logits.mul_((grad_loss * keep).unsqueeze(1))  # ignored rows: zero gradient
                if softcap:
                    grad_logits.mul_(tanh.square_().neg_().add_(1.0))  # d(s tanh(z/s))/dz = 1 - tanh^2
                grad_logits_in = grad_logits if low_buffer is None else low_buffer[:n_chunk].copy_(grad_logits)
                if want_hidden:
                    torch.mm(grad_logits_in, weight, out=grad_hidden[rows])
                if want_weight and grad_weight_chunk is None:
                    grad_weight.addmm_(grad_logits.T, hidden_chunk)
                elif want_weight:
                    grad_weight += torch.mm(grad_logits_in.T, hidden_chunk, out=grad_weight_chunk)
                if want_bias:
                    grad_bias += grad_logits.sum(dim=0)
        del probs_buffer, low_buffer, tanh_buffer, grad_weight_chunk
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for the softmax and every sum; fp64 inputs (gradcheck) keep fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_buffers(rows: int, weight: torch.Tensor, acc_dtype: torch.dtype):
    """The [rows, V] fp32 logits buffer, and an input-dtype one when the head runs in lower precision."""
    shape = (rows, weight.shape[0])
    low = torch.empty(shape, dtype=weight.dtype, device=weight.device) if weight.dtype != acc_dtype else None
    return torch.empty(shape, dtype=acc_dtype, device=weight.device), low


def _head_into(buffer, low_buffer, hidden_chunk, weight, bias) -> torch.Tensor:
    """hidden_chunk @ weight.T + bias, computed in the input dtype, written into buffer[:rows] (fp32)."""
    rows = hidden_chunk.shape[0]
    out = buffer[:rows] if low_buffer is None else low_buffer[:rows]
    if bias is None:
        torch.mm(hidden_chunk, weight.T, out=out)
    else:
        torch.addmm(bias, hidden_chunk, weight.T, out=out)
    return out if low_buffer is None else buffer[:rows].copy_(out)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int = 4096,
    ignore_index: int = IGNORE_INDEX,
    softcap: float | None = None,
) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy of the LM head's logits, without materialising them.

    hidden: [N, H] final hidden states; weight: [V, H] LM head; bias: [V] or None;
    targets: [N] long, `ignore_index` where no loss applies. softcap: Gemma-style final
    logit soft-capping (logits = softcap * tanh(logits / softcap)), None for none.
    chunk_size: rows per chunk; the peak extra memory is a few [chunk_size, V] fp32 buffers.
    Under torch.autocast the head runs in the autocast dtype, as nn.Linear would.
    Returns (loss_sum: scalar fp32 tensor (fp64 for fp64 inputs), n_targets: int), equal to
    (F.cross_entropy((hidden @ weight.T + bias).float(), targets, reduction="sum"), #non-ignored).
    """
    _check_inputs(hidden, weight, targets, bias, chunk_size)
    hidden, weight, bias = _autocast_inputs(hidden, weight, bias)
    keep = targets != ignore_index
    n_targets = int(keep.sum())
    if n_targets < targets.shape[0]:  # ignored rows would cost head FLOPs for nothing
        hidden, targets = hidden[keep], targets[keep]
    loss_sum = ChunkedLinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_size, ignore_index, softcap)
    return loss_sum, n_targets


def cut_cross_entropy_available() -> bool:
    """Whether the cut-cross-entropy package (the `cce` extra) is installed."""
    return importlib.util.find_spec("cut_cross_entropy") is not None


def cce_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int = 4096,
    ignore_index: int = IGNORE_INDEX,
    softcap: float | None = None,
) -> tuple[torch.Tensor, int]:
    """`linear_cross_entropy` through cut-cross-entropy (Wijmans et al. 2024); same arguments and returns.

    On CUDA it runs the package's Triton kernel, which computes logits block by block in
    on-chip memory and skips gradient blocks below its `filter_eps` (the package default,
    "high"), so gradients match ours to bf16-level tolerance, not exactly. Elsewhere it
    runs the package's impl="torch_compile", which compiles the plain full-logits loss
    (no memory saving; useful to check agreement on CPU). chunk_size is accepted for a
    common signature and unused: the kernel picks its own blocks. The package (25.1) has
    no bias argument, so a bias is folded in as one more hidden feature fixed at 1
    ([hidden, 1] @ [weight, bias]^T), at the cost of one copy of the weight.
    """
    cce = require("cut_cross_entropy", package="cut-cross-entropy", extra="cce",
                  wanted_by="kernels.cut_ce=cce")
    _check_inputs(hidden, weight, targets, bias, chunk_size)
    hidden, weight, bias = _autocast_inputs(hidden, weight, bias)
    n_targets = int((targets != ignore_index).sum())
    if n_targets == 0:  # zero, still connected to the inputs, so backward gives zero gradients
        parts = [hidden[:0].sum(), weight[:0].sum()] + ([bias[:0].sum()] if bias is not None else [])
        return sum(parts).float(), 0
    if bias is not None:
        hidden = torch.cat([hidden, hidden.new_ones(hidden.shape[0], 1)], dim=1)
        weight = torch.cat([weight, bias.unsqueeze(1)], dim=1)
    impl = "cce" if hidden.is_cuda else "torch_compile"
    loss_sum = cce.linear_cross_entropy(hidden, weight, targets, ignore_index=ignore_index, softcap=softcap,
                                        reduction="sum", impl=impl)
    return loss_sum.float(), n_targets


def _check_inputs(hidden, weight, targets, bias, chunk_size) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden must be [N, H] and weight [V, H]; got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}.")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be [N] = [{hidden.shape[0]}]; got {tuple(targets.shape)}.")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be [V] = [{weight.shape[0]}]; got {tuple(bias.shape)}.")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive; got {chunk_size}.")


def _autocast_inputs(hidden, weight, bias):
    """Cast to the autocast dtype when autocast is on (what F.linear would do); else require one dtype."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        return hidden.to(dtype), weight.to(dtype), bias.to(dtype) if bias is not None else None
    dtypes = {hidden.dtype, weight.dtype} | ({bias.dtype} if bias is not None else set())
    if len(dtypes) > 1:
        raise ValueError(f"hidden, weight and bias must share a dtype (or run under torch.autocast); "
                         f"got {sorted(str(d) for d in dtypes)}.")
    return hidden, weight, bias
