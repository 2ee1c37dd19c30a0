"""Vocabulary projection fused with the cross entropy, in chunks of rows.

    loss = mean_t [ logsumexp_v (h_t · w_v) - h_t · w_{y_t} ]        h (T, W), w (V, W), y (T,)

The plain path materialises the (T, V) logits, their float32 copy, the softmax and its
gradient: with V = 30k that is the largest activation of a MELP step. Here the rows go through
in chunks of ``chunk``: each chunk's logits live only while its loss and its gradients are
computed (softmax - one-hot, scaled by 1/T), and the gradients with respect to h (per chunk) and
w (summed over chunks, in float32) are kept for the backward, which only scales them by the
incoming gradient (Liger-Kernel's fused linear cross entropy does the same). Peak memory is
(chunk x V) instead of (T x V); FLOPs are those of the plain path (the backward's products run
in the forward). Without grad mode only the loss is computed.

Numerics: the products run in the inputs' dtype (bf16 under autocast, as the plain
``nn.Linear``), the softmax, the loss and the weight-gradient sum in float32 (float64
for float64 inputs), as the plain path's ``logits.float()``.
"""
from __future__ import annotations

import torch


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross entropy of ``hidden @ weight.T`` against ``targets``, computed in row chunks."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                chunk: int) -> torch.Tensor:
        rows = hidden.shape[0]
        needs = ctx.needs_input_grad
        dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(
            hidden.device.type) else torch.promote_types(hidden.dtype, weight.dtype)
        exact = torch.promote_types(dtype, torch.float32)  # softmax, loss, weight-gradient sums
        grad_hidden = torch.empty_like(hidden) if needs[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=exact, device=weight.device) if needs[1] else None
        total = torch.zeros((), dtype=exact, device=hidden.device)
        w = weight.to(dtype)
        for start in range(0, rows, chunk):
            h = hidden[start:start + chunk].to(dtype)
            y = targets[start:start + chunk]
            logits = (h @ w.T).to(exact)  # (c, V): the only vocabulary-wide tensor, one chunk at a time
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
            if grad_hidden is None and grad_weight is None:
                continue
            grad_logits = torch.softmax(logits, dim=-1)  # d(mean CE)/d logits = (p - onehot) / T
            grad_logits[torch.arange(y.shape[0], device=y.device), y] -= 1.0
            grad_logits = (grad_logits / rows).to(dtype)
            if grad_hidden is not None:
                grad_hidden[start:start + chunk] = (grad_logits @ w).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += (grad_logits.T @ h).to(exact)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total / max(rows, 1)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_output.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_output.to(grad_weight.dtype)).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                 chunk: int) -> torch.Tensor:
    """hidden (T, W), weight (V, W) of a bias-free projection, targets (T,) int64 -> mean CE
    (0-d, float32 or float64 with float64 inputs), the same value and gradients as ``F.cross_entropy((hidden @ weight.T).float(),
    targets)`` without the (T, V) logits. ``chunk``: rows per chunk (> 0)."""
    if chunk < 1:
        raise ValueError(f"decoder.vocab_chunk: {chunk} rows per chunk; must be >= 1 (0 = plain path)")
    if hidden.shape[0] == 0:  # no target: the plain path's mean over nothing
        return (hidden.sum() * 0 + weight.sum() * 0).float() / 0.0
    return ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk)
