"""Self-attention with dropout that keeps no (N x N) float tensor for the backward (CPU lever).

On the CPU, ``F.scaled_dot_product_attention`` with ``dropout_p > 0`` runs its plain ("math")
path: it keeps the softmax probabilities, the float dropout noise and the dropped probabilities
for the backward, three float (B, heads, N, N) tensors per layer. In the paper's ECG encoder
(batch 8, 12 heads, 312 tokens) that is 112 MB per layer, 0.9 GB over its 8 layers, about an
eighth of the whole step's peak memory. CUDA's fused SDPA kernels already keep none; this module
is for the CPU path, and ``attention`` falls back to SDPA wherever it would not help.

:class:`RecomputedAttention` keeps q, k, v, the dropout mask as one byte per weight and the
row log-sum-exp, and in the backward recomputes the probabilities one batch chunk at a time
(one more q kᵀ product, 2·N²·d FLOPs per head, ~4 % of an ECG layer's). The mask is drawn as
the plain path draws it (one ``bernoulli_`` over the whole (B, heads, N, N) shape, same
generator calls), so with the same seed both paths drop the same weights and give the same loss
and gradients to fp32 rounding (tests/test_attention.py, tests/test_levers.py).

Gradients (P = softmax(S), S = scale·q kᵀ, Pd = P ∘ M / (1 - p), O = Pd v, M the keep mask):
  dV = Pdᵀ dO;  dP = (dO vᵀ) ∘ M / (1 - p);  dS = P ∘ (dP - rowsum(P ∘ dP));
  dQ = scale · dS k;  dK = scale · dSᵀ q.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Elements of (rows x N) float work tensors per backward chunk: bounds the transient memory
# (about three such tensors live at once) while keeping the batched products large.
CHUNK_ELEMENTS = 1 << 22


def _buffer(like: torch.Tensor) -> torch.Tensor:
    """Uninitialised contiguous gradient buffer (every element is written; tests poison it)."""
    return torch.empty(like.shape, dtype=like.dtype, device=like.device)


class RecomputedAttention(torch.autograd.Function):
    """softmax(scale · q kᵀ) with dropout, times v; q, k, v: (B, heads, N, d)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: float,
                scale: float) -> torch.Tensor:
        scores = torch.matmul(q, k.transpose(-2, -1)).mul_(scale)  # (B, h, N, N)
        row_max = scores.amax(dim=-1, keepdim=True)
        probs = scores.sub_(row_max).exp_()
        row_sum = probs.sum(dim=-1, keepdim=True)
        probs.div_(row_sum)
        lse = row_max.add_(row_sum.log_())  # (B, h, N, 1)
        keep = torch.empty(probs.shape, dtype=torch.bool, device=probs.device).bernoulli_(1.0 - p)
        probs.mul_(keep).mul_(1.0 / (1.0 - p))
        out = torch.matmul(probs, v)
        del probs
        ctx.save_for_backward(q, k, v, keep, lse)
        ctx.p, ctx.scale = p, scale
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        q, k, v, keep, lse = ctx.saved_tensors
        inv_keep = 1.0 / (1.0 - ctx.p)
        grad_out = grad_out.contiguous()
        grad_q, grad_k, grad_v = (_buffer(t) for t in (q, k, v))
        batch, heads, length = q.shape[:3]
        step = max(1, CHUNK_ELEMENTS // max(1, heads * length * k.shape[2]))
        for start in range(0, batch, step):
            rows = slice(start, start + step)
            qc, kc, vc, go = q[rows], k[rows], v[rows], grad_out[rows]
            probs = torch.matmul(qc, kc.transpose(-2, -1)).mul_(ctx.scale).sub_(lse[rows]).exp_()
            mask = keep[rows]
            dropped = probs * mask
            dropped.mul_(inv_keep)
            grad_v[rows] = torch.matmul(dropped.transpose(-2, -1), go)
            del dropped
            grad_probs = torch.matmul(go, vc.transpose(-2, -1)).mul_(mask).mul_(inv_keep)  # dP
            delta = (probs * grad_probs).sum(dim=-1, keepdim=True)
            grad_scores = grad_probs.sub_(delta).mul_(probs)  # dS = P ∘ (dP - delta)
            del probs
            torch.matmul(grad_scores, kc, out=grad_q[rows]).mul_(ctx.scale)
            torch.matmul(grad_scores.transpose(-2, -1), qc, out=grad_k[rows]).mul_(ctx.scale)
        return grad_q, grad_k, grad_v, None, None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float,
              recompute: bool = False) -> torch.Tensor:
    """Scaled dot-product self-attention (no mask) of (B, heads, N, d) tensors.

    ``recompute`` takes :class:`RecomputedAttention` where it saves memory: dropout on, a
    gradient needed, a CPU fp32/fp64 tensor. Anywhere else it is SDPA (no dropout: SDPA's fused
    CPU kernel keeps no N x N tensor either; CUDA: its fused kernels handle dropout).
    """
    if (recompute and dropout_p > 0.0 and q.device.type == "cpu" and torch.is_grad_enabled()
            and q.dtype in (torch.float32, torch.float64) and any(t.requires_grad for t in (q, k, v))):
        return RecomputedAttention.apply(q, k, v, dropout_p, 1.0 / math.sqrt(q.shape[-1]))
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
