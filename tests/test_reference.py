"""The PyTorch references in kernels/reference.py against plain float64 loops written from the paper's math.

The loops share no code with the references: attention per (sample, head, query), the
local loss per (text, ECG) pair and sentence, InfoNCE as two explicit cross-entropy sums.
Values and the gradients of every input are compared (grad_output != 1).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before `kernels` imports triton (see kernel_utils)

import math

import pytest

import kernels
from kernels import reference
from tests.kernel_utils import assert_rel_close, fresh_seed

TOL = 1e-10  # float64 against float64: only summation order differs


def _softmax(values: list[torch.Tensor]) -> list[torch.Tensor]:
    top = max(v.item() for v in values)
    exps = [torch.exp(v - top) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def _logsumexp(values: list[torch.Tensor]) -> torch.Tensor:
    top = max(v.item() for v in values)
    return top + torch.log(sum(torch.exp(v - top) for v in values))


def _grads(loss: torch.Tensor, inputs: list[torch.Tensor], grad_output: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, inputs, grad_output))


def loop_attention_pool(queries, keys, values, num_heads, key_padding_mask):
    batch, num_keys, dim = keys.shape
    head_dim = dim // num_heads
    num_queries = queries.shape[-2]
    rows = []
    for b in range(batch):
        q_b = queries if queries.ndim == 2 else queries[b]
        per_query = []
        for qi in range(num_queries):
            heads = []
            for h in range(num_heads):
                cols = slice(h * head_dim, (h + 1) * head_dim)
                kept = [n for n in range(num_keys) if key_padding_mask is None or not key_padding_mask[b, n]]
                scores = [torch.dot(q_b[qi, cols], keys[b, n, cols]) / math.sqrt(head_dim) for n in kept]
                weights = _softmax(scores)
                heads.append(sum(w * values[b, n, cols] for w, n in zip(weights, kept)))
            per_query.append(torch.cat(heads))
        rows.append(torch.stack(per_query))
    return torch.stack(rows)


def loop_local_loss(beats, sentences, sentence_counts, t1, t2, t3):
    kept = [i for i in range(beats.shape[0]) if int(sentence_counts[i]) > 0]
    num_beats = beats.shape[1]

    def similarity(i: int, j: int) -> torch.Tensor:
        num_sent = int(sentence_counts[i])
        s = sentences[i, :num_sent]
        b = beats[j]
        first = [_softmax([torch.dot(b[q], s[k]) for k in range(num_sent)]) for q in range(num_beats)]
        cosines = []
        for k in range(num_sent):
            second = _softmax([t1 * first[q][k] for q in range(num_beats)])
            context = sum(second[q] * b[q] for q in range(num_beats))
            cosines.append(t2 * torch.dot(s[k], context) / (s[k].norm() * context.norm()))
        return _logsumexp(cosines)

    logits = [[t3 * similarity(i, j) for i in kept] for j in kept]  # M[j][i]
    count = len(kept)
    ce_rows = sum(_logsumexp(logits[j]) - logits[j][j] for j in range(count)) / count
    ce_cols = sum(_logsumexp([logits[j][i] for j in range(count)]) - logits[i][i] for i in range(count)) / count
    return 0.5 * (ce_rows + ce_cols)


def loop_infonce(x, t, logit_scale):
    scale = torch.exp(logit_scale)
    num_rows = x.shape[0]
    logits = [[scale * torch.dot(x[i], t[j]) for j in range(num_rows)] for i in range(num_rows)]
    ce_x = sum(_logsumexp(logits[i]) - logits[i][i] for i in range(num_rows)) / num_rows
    ce_t = sum(_logsumexp([logits[i][j] for i in range(num_rows)]) - logits[j][j] for j in range(num_rows)) / num_rows
    return 0.5 * (ce_x + ce_t)


@pytest.mark.parametrize("shared_queries", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_attention_pool_matches_loop(shared_queries: bool, masked: bool) -> None:
    seed = fresh_seed()
    batch, num_queries, num_keys, dim, num_heads = 2, 3, 7, 12, 3
    q_shape = (num_queries, dim) if shared_queries else (batch, num_queries, dim)
    inputs = [torch.randn(shape, dtype=torch.float64, requires_grad=True)
              for shape in (q_shape, (batch, num_keys, dim), (batch, num_keys, dim))]
    mask = torch.rand(batch, num_keys) < 0.4 if masked else None
    if mask is not None:
        mask[:, 0] = False
    grad_out = torch.randn(batch, num_queries, dim, dtype=torch.float64)
    out = reference.attention_pool(*inputs, num_heads, mask)
    ref = loop_attention_pool(*inputs, num_heads, mask)
    context = f"seed={seed} shared={shared_queries} masked={masked}"
    assert_rel_close("out", out, ref, TOL, context)
    for name, g, g_ref in zip(("dq", "dk", "dv"), _grads(out, inputs, grad_out), _grads(ref, inputs, grad_out)):
        assert_rel_close(name, g, g_ref, TOL, context)


def test_attention_pool_keeps_dtype_and_rejects_fully_masked_rows() -> None:
    queries, keys = torch.randn(4, 8, dtype=torch.float16), torch.randn(2, 5, 8, dtype=torch.float16)
    assert kernels.attention_pool(queries, keys, keys, 2).dtype == torch.float16
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[1] = True
    with pytest.raises(ValueError, match="masks every key"):
        reference.attention_pool(queries, keys, keys, 2, mask)
    with pytest.raises(ValueError, match="num_heads"):
        reference.attention_pool(queries, keys, keys, 3)


def test_local_loss_matches_pair_loop() -> None:
    seed = fresh_seed()
    batch, num_beats, max_sentences, dim = 5, 4, 3, 6
    beats = torch.randn(batch, num_beats, dim, dtype=torch.float64, requires_grad=True)
    counts = torch.tensor([2, 0, 3, 1, 3])  # variable counts and a text without sentences
    sentences = torch.randn(batch, max_sentences, dim, dtype=torch.float64)
    sentences = (sentences * (torch.arange(max_sentences)[None, :, None] < counts[:, None, None])).requires_grad_()
    loss = reference.local_contrastive_loss(beats, sentences, counts, 4.0, 5.0, 10.0)
    ref = loop_local_loss(beats, sentences, counts, 4.0, 5.0, 10.0)
    context = f"seed={seed}"
    assert_rel_close("loss", loss, ref, TOL, context)
    grad_out = torch.tensor(0.7, dtype=torch.float64)
    grads, grads_ref = _grads(loss, [beats, sentences], grad_out), _grads(ref, [beats, sentences], grad_out)
    for name, g, g_ref in zip(("dbeats", "dsentences"), grads, grads_ref):
        assert_rel_close(name, g, g_ref, TOL, context)
    assert grads[0][1].abs().max() == 0 and grads[1][1].abs().max() == 0, "the dropped pair must get no gradient"


def test_local_loss_drops_empty_texts_from_both_sides() -> None:
    seed = fresh_seed()
    beats, sentences = torch.randn(4, 5, 8, dtype=torch.float64), torch.randn(4, 3, 8, dtype=torch.float64)
    counts = torch.tensor([3, 0, 2, 1])
    kept = torch.tensor([0, 2, 3])
    full = reference.local_contrastive_loss(beats, sentences, counts)
    subset = reference.local_contrastive_loss(beats[kept], sentences[kept], counts[kept])
    assert_rel_close("loss", full, subset, TOL, f"seed={seed}")


def test_local_loss_without_sentences_is_a_differentiable_zero() -> None:
    beats = torch.randn(3, 4, 8, requires_grad=True)
    sentences = torch.zeros(3, 2, 8, requires_grad=True)
    loss = kernels.local_contrastive_loss(beats, sentences, torch.zeros(3, dtype=torch.long))
    assert loss.item() == 0.0 and loss.dtype == torch.float32
    loss.backward()
    assert beats.grad is not None and beats.grad.abs().max() == 0


def test_local_loss_rejects_bad_counts() -> None:
    beats, sentences = torch.randn(2, 4, 8), torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="sentence_counts"):
        reference.local_contrastive_loss(beats, sentences, torch.tensor([1, 4]))
    with pytest.raises(ValueError, match="integer"):
        reference.local_contrastive_loss(beats, sentences, torch.tensor([1.0, 2.0]))


@pytest.mark.parametrize("num_rows", [1, 6])
def test_infonce_matches_two_cross_entropies(num_rows: int) -> None:
    seed = fresh_seed()
    x = torch.nn.functional.normalize(torch.randn(num_rows, 5, dtype=torch.float64), dim=-1).requires_grad_()
    t = torch.nn.functional.normalize(torch.randn(num_rows, 5, dtype=torch.float64), dim=-1).requires_grad_()
    logit_scale = torch.tensor(math.log(100.0), dtype=torch.float64, requires_grad=True)
    loss = reference.infonce_loss(x, t, logit_scale)
    ref = loop_infonce(x, t, logit_scale)
    context = f"seed={seed} N={num_rows}"
    assert_rel_close("loss", loss, ref, TOL, context)
    grad_out = torch.tensor(-1.3, dtype=torch.float64)
    inputs = [x, t, logit_scale]
    for name, g, g_ref in zip(("dx", "dt", "dscale"), _grads(loss, inputs, grad_out), _grads(ref, inputs, grad_out)):
        assert_rel_close(name, g, g_ref, TOL, context)


def test_infonce_computes_in_fp32_and_validates() -> None:
    x = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1).half()
    assert reference.infonce_loss(x, x, torch.tensor(2.0)).dtype == torch.float32
    with pytest.raises(ValueError, match="0-d"):
        reference.infonce_loss(x, x, torch.tensor([2.0]))
    with pytest.raises(ValueError, match="shape"):
        reference.infonce_loss(x, x[:3], torch.tensor(2.0))
    with pytest.raises(ValueError, match="impl"):
        kernels.infonce_loss(x, x, torch.tensor(2.0), impl="cuda")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.nn.functional.normalize(torch.randn(4, 16), dim=-1)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        kernels.infonce_loss(x, x, torch.tensor(2.0), impl="triton")
