"""RecomputedAttention (melp_scale.model.attention): the CPU attention-with-dropout lever.

Checked against a float64 softmax(q kᵀ/√d) ∘ M/(1-p) · v written out here, with the same keep
mask M drawn from the same seed, and against SDPA's own dropout path with the same seed;
gradients of q, k and v; batch chunks that do not divide the batch; poisoned gradient buffers.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from melp_scale.model import attention as attention_module
from melp_scale.model.attention import RecomputedAttention, attention
from tests.kernel_utils import relative_error


def inputs(batch: int, heads: int, length: int, dim: int, dtype=torch.float32):
    return [torch.randn(batch, heads, length, dim, dtype=dtype, requires_grad=True) for _ in range(3)]


def reference(q, k, v, keep: torch.Tensor, p: float) -> torch.Tensor:
    q, k, v = (t.double() for t in (q, k, v))
    probs = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
    return (probs * keep.double() / (1.0 - p)) @ v


@pytest.fixture
def poisoned(monkeypatch):
    """Gradient buffers start as NaN: an element the backward forgets to write shows."""
    monkeypatch.setattr(attention_module, "_buffer", lambda like: torch.full_like(
        like, float("nan"), memory_format=torch.contiguous_format))


@pytest.mark.parametrize("shape,chunk", [((3, 2, 37, 8), 2 * 37 * 37), ((1, 3, 5, 4), 1 << 22),
                                         ((5, 1, 19, 6), 1)])
def test_matches_float64_reference_with_the_same_mask(poisoned, monkeypatch, shape, chunk):
    monkeypatch.setattr(attention_module, "CHUNK_ELEMENTS", chunk)  # ragged batch chunks
    p = 0.3
    q, k, v = inputs(*shape)
    seed = torch.randint(0, 2**31 - 1, ()).item()
    torch.manual_seed(seed)
    out = RecomputedAttention.apply(q, k, v, p, 1.0 / math.sqrt(shape[-1]))
    torch.manual_seed(seed)
    keep = torch.empty(shape[:3] + (shape[2],), dtype=torch.bool).bernoulli_(1.0 - p)
    assert 0.4 < keep.float().mean().item() < 0.95  # the mask really drops weights
    ref = reference(q, k, v, keep, p)
    assert relative_error(out, ref) < 1e-5
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad.double())
    for name, g, w in zip("qkv", got, want):
        assert torch.isfinite(g).all(), name
        assert relative_error(g, w) < 1e-5, (name, relative_error(g, w))


def test_same_loss_and_gradients_as_sdpa_dropout_path():
    """Same seed, same dropped weights as F.scaled_dot_product_attention(dropout_p=p) on the CPU."""
    q, k, v = inputs(2, 3, 29, 8)
    grad = torch.randn(2, 3, 29, 8)
    results = []
    for recompute in (False, True):
        torch.manual_seed(7)
        out = attention(q, k, v, 0.2, recompute=recompute)
        results.append((out, torch.autograd.grad(out, (q, k, v), grad)))
    (sdpa, sdpa_grads), (mine, mine_grads) = results
    assert relative_error(mine, sdpa) < 1e-5
    for g, w in zip(mine_grads, sdpa_grads):
        assert relative_error(g, w) < 1e-5


def test_keeps_no_float_square_tensor():
    batch, heads, length, dim = 2, 4, 64, 8
    q, k, v = inputs(batch, heads, length, dim)
    saved = {}
    for recompute in (False, True):
        tensors = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: tensors.append(t) or t, lambda t: t):
            attention(q * 1, k * 1, v * 1, 0.1, recompute=recompute)
        saved[recompute] = tensors
    square = lambda t: t.dim() == 4 and t.shape[-2:] == (length, length) and t.is_floating_point()
    assert sum(square(t) for t in saved[False]) >= 2  # SDPA's dropout path keeps probabilities
    assert not any(square(t) for t in saved[True])
    masks = [t for t in saved[True] if t.dtype == torch.bool]
    assert [tuple(m.shape) for m in masks] == [(batch, heads, length, length)]


@pytest.mark.parametrize("case", ["no_dropout", "no_grad", "float16"])
def test_falls_back_to_sdpa_where_it_would_not_help(case):
    q, k, v = inputs(2, 2, 11, 4)
    p = 0.0 if case == "no_dropout" else 0.25
    if case == "float16":
        q, k, v = (t.detach().half().requires_grad_() for t in (q, k, v))
    torch.manual_seed(3)
    with torch.set_grad_enabled(case != "no_grad"):
        out = attention(q, k, v, p, recompute=True)
    torch.manual_seed(3)
    with torch.set_grad_enabled(case != "no_grad"):
        want = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
    assert torch.equal(out, want)
    if case != "no_grad":
        assert out.grad_fn is not None and "Recomputed" not in type(out.grad_fn).__name__
