"""The fused local beat-sentence loss (Triton) against float64 references (CPU: Triton's interpreter).

Every run draws fresh inputs (the seed is in each failure message): random sentence counts
from 0 to S_max (at least one text without sentences, at least two with), B not a power of
two, fp32 and fp16. Loss and the gradients of beats and sentences, under a grad_output != 1,
are compared by relative error ||out − ref|| / ||ref|| with autograd through
``kernels.reference`` in float64 on the same (rounded) inputs, and with an explicit per-pair
loop written here from the MELP paper. Kernel outputs are allocated NaN-filled so an unwritten
element fails. Also: bf16 and fp16 through the CUDA launch configurations (on CPU under the
interpreter's bf16 shim, tests/kernel_utils.gpu_numerics), the chunked backward, a strided
int32 sentence_counts, double backward (must raise) and torch.compile(fullgraph=True) of the
reference and the Triton path (no host sync).
"""

from __future__ import annotations

import contextlib
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest
import torch.nn.functional as F

import kernels
import kernels.local_contrastive
from kernels import reference
from tests.kernel_utils import (
    INTERPRETER_HINT,
    assert_rel_close,
    fresh_seed,
    gpu_numerics,
    poisoned_allocations,
    use_triton_interpreter,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
local = kernels.local_contrastive if DEVICE == "cuda" else use_triton_interpreter(kernels.local_contrastive)
T1, T2, T3 = 4.0, 5.0, 10.0


@pytest.fixture(autouse=True)
def _kernels_runnable() -> None:
    if local is None:
        pytest.fail(INTERPRETER_HINT)


# dtype -> (loss tolerance, gradient tolerance), relative to the float64 reference of the same
# (rounded) inputs. Everything after the input products is fp32: observed errors are ~1e-7
# (loss) and ~1e-6 (gradients; M = τ3·R amplifies a cosine's rounding by τ2·τ3 = 50); the
# margin covers 3×TF32 dots on a GPU. fp16: the gradients are stored in fp16 (rounding alone
# is ~3e-4 rms relative); the loss is fp32 from exact fp16 products.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-5, 5e-5),
    torch.float16: (2e-5, 2e-3),
    torch.bfloat16: (2e-5, 1.6e-2),
}
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def _inputs(batch: int, num_beats: int, max_sentences: int, dim: int, dtype: torch.dtype, scale: float):
    """Beats, zero-padded sentences and counts in [0, S_max], ≥ 1 empty text and ≥ 2 non-empty."""
    counts = torch.randint(0, max_sentences + 1, (batch,))
    counts[torch.randperm(batch)[:3]] = torch.tensor([0, max_sentences, 1])
    beats = (torch.randn(batch, num_beats, dim, dtype=torch.float64) * scale).to(dtype)
    valid = torch.arange(max_sentences)[None, :, None] < counts[:, None, None]
    sentences = (torch.randn(batch, max_sentences, dim, dtype=torch.float64) * scale * valid).to(dtype)
    return beats.to(DEVICE), sentences.to(DEVICE), counts.to(DEVICE)


def _reference_grads(beats, sentences, counts, grad_out):
    inputs = [v.detach().double().requires_grad_() for v in (beats, sentences)]
    loss = reference.local_contrastive_loss(*inputs, counts, T1, T2, T3)
    return [loss.detach(), *torch.autograd.grad(loss, inputs, grad_out.double())]


def _triton_grads(beats, sentences, counts, grad_out):
    inputs = [v.detach().clone().requires_grad_() for v in (beats, sentences)]
    with poisoned_allocations():
        loss = local.local_contrastive_loss(*inputs, counts, T1, T2, T3, impl="triton")
        grads = torch.autograd.grad(loss, inputs, grad_out)
    return [loss.detach(), *grads]


def loop_similarity(beats, sentences, counts, t1, t2):
    """R[i][j] for the kept texts i and ECGs j, one (text, ECG) pair at a time (float64)."""
    kept = [i for i in range(beats.shape[0]) if int(counts[i]) > 0]
    rows = []
    for i in kept:
        s = sentences[i, :int(counts[i])]  # (S_i, D)
        row = []
        for j in kept:
            b = beats[j]  # (Qb, D)
            first = torch.softmax(b @ s.T, dim=1)  # a_qk, over sentences
            second = torch.softmax(t1 * first, dim=0)  # α_kq stored as [q, k], over beats
            context = second.T @ b  # c_k: (S_i, D)
            cosine = (s * context).sum(-1) / (s.norm(dim=-1).clamp_min(1e-8) * context.norm(dim=-1).clamp_min(1e-8))
            row.append(torch.logsumexp(t2 * cosine, dim=0))
        rows.append(torch.stack(row))
    return torch.stack(rows)  # (B', B'): text i, ECG j


def loop_loss(beats, sentences, counts, t1, t2, t3):
    logits = t3 * loop_similarity(beats, sentences, counts, t1, t2).T  # M[j, i]
    labels = torch.arange(logits.shape[0])
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def _check(batch, num_beats, max_sentences, dim, dtype, scale, grad_value=-0.7):
    seed = fresh_seed()
    beats, sentences, counts = _inputs(batch, num_beats, max_sentences, dim, dtype, scale)
    grad_out = torch.tensor(grad_value, device=DEVICE)
    out = _triton_grads(beats, sentences, counts, grad_out)
    ref = _reference_grads(beats, sentences, counts, grad_out)
    loss_tol, grad_tol = TOLERANCES[dtype]
    context = (f"seed={seed} B={batch} Qb={num_beats} S={max_sentences} D={dim} {dtype} scale={scale:.3g} "
               f"counts={counts.tolist()}")
    assert out[0].dtype == torch.float32 and out[1].dtype == dtype and out[2].dtype == dtype, context
    for name, value, expected, tol in zip(("loss", "dbeats", "dsentences"), out, ref, (loss_tol, grad_tol, grad_tol)):
        assert_rel_close(name, value, expected, tol, context)
    empty = counts == 0
    assert out[1][empty].abs().max() == 0 and out[2][empty].abs().max() == 0, f"dropped pairs got gradient [{context}]"
    padded = torch.arange(max_sentences, device=DEVICE)[None, :] >= counts[:, None]
    assert out[2][padded].abs().max() == 0, f"padded sentences got gradient [{context}]"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,max_sentences,dim", [(5, 18, 32), (7, 9, 64), (13, 18, 64)])
def test_local_loss_matches_reference(batch: int, max_sentences: int, dim: int, dtype: torch.dtype) -> None:
    _check(batch, 10, max_sentences, dim, dtype, scale=dim**-0.25)  # ⟨b, s⟩ ~ N(0, 1): soft softmaxes


def test_local_loss_paper_width_and_raw_scale() -> None:
    """D = 256 with unit-variance features: ⟨b, s⟩ ~ N(0, 256), a near one-hot first softmax."""
    _check(6, 10, 18, 256, torch.float32, scale=1.0, grad_value=1.3)


def test_local_loss_awkward_shapes() -> None:
    """Qb = 17 (BLOCK_Q = 32), D = 48 (not a power of two), S = 3 (BLOCK_S = 16)."""
    _check(7, 17, 3, 48, torch.float32, scale=48**-0.25)


def test_local_loss_matches_pair_loop() -> None:
    """Similarity matrix, loss and gradients against the explicit per-pair loop in float64."""
    seed = fresh_seed()
    beats, sentences, counts = _inputs(7, 10, 18, 32, torch.float32, scale=32**-0.25)
    context = f"seed={seed} counts={counts.tolist()}"
    keep = counts > 0
    with poisoned_allocations():
        similarity = local.local_similarity(beats, sentences, counts, T1, T2)[keep][:, keep]
    loop_inputs = [v.detach().double().cpu().requires_grad_() for v in (beats, sentences)]
    assert_rel_close("R", similarity, loop_similarity(*loop_inputs, counts.cpu(), T1, T2), 1e-6, context)
    grad_out = torch.tensor(2.1, device=DEVICE)
    out = _triton_grads(beats, sentences, counts, grad_out)
    loss = loop_loss(*loop_inputs, counts.cpu(), T1, T2, T3)
    ref = [loss.detach(), *torch.autograd.grad(loss, loop_inputs, grad_out.double().cpu())]
    loss_tol, grad_tol = TOLERANCES[torch.float32]
    for name, value, expected, tol in zip(("loss", "dbeats", "dsentences"), out, ref, (loss_tol, grad_tol, grad_tol)):
        assert_rel_close(name, value, expected, tol, context)


def test_local_loss_non_contiguous_inputs_and_other_temperatures() -> None:
    seed = fresh_seed()
    beats, sentences, counts = _inputs(6, 10, 7, 32, torch.float32, scale=32**-0.25)
    counts = counts.clamp_min(1)  # no text dropped: the strided sentences reach the kernels uncopied
    valid = torch.arange(7, device=DEVICE)[None, :, None] < counts[:, None, None]
    sentences = torch.randn(sentences.shape, device=DEVICE) * 32**-0.25 * valid
    beats_view = beats.transpose(1, 2).contiguous().transpose(1, 2)  # unit stride on Qb, not on D
    sentences_view = torch.cat([sentences, sentences], dim=1)[:, :7]  # stride 14·D between texts
    inputs = [beats_view.requires_grad_(), sentences_view.requires_grad_()]
    with poisoned_allocations():
        loss = local.local_contrastive_loss(*inputs, counts, 2.0, 3.0, 7.0, impl="triton")
        grads = torch.autograd.grad(loss, inputs)
    ref_inputs = [v.detach().double().requires_grad_() for v in (beats, sentences)]
    ref_loss = reference.local_contrastive_loss(*ref_inputs, counts, 2.0, 3.0, 7.0)
    context = f"seed={seed} t=(2, 3, 7)"
    assert_rel_close("loss", loss, ref_loss, TOLERANCES[torch.float32][0], context)
    for name, g, g_ref in zip(("dbeats", "dsentences"), grads, torch.autograd.grad(ref_loss, ref_inputs)):
        assert_rel_close(name, g, g_ref, TOLERANCES[torch.float32][1], context)


def test_local_loss_zero_sentence_uses_the_norm_floor() -> None:
    """A counted all-zero sentence: ‖s‖ under ε = 1e-8, cos = 0 and the floored gradient (~1/ε)."""
    seed = fresh_seed()
    beats, sentences, counts = _inputs(5, 10, 4, 16, torch.float32, scale=0.5)
    row = int(counts.argmax())
    sentences[row, 0] = 0.0
    out = _triton_grads(beats, sentences, counts, torch.tensor(0.9, device=DEVICE))
    ref = _reference_grads(beats, sentences, counts, torch.tensor(0.9, device=DEVICE))
    context = f"seed={seed} zero sentence at ({row}, 0)"
    loss_tol, grad_tol = TOLERANCES[torch.float32]
    for name, value, expected, tol in zip(("loss", "dbeats", "dsentences"), out, ref, (loss_tol, grad_tol, grad_tol)):
        assert_rel_close(name, value, expected, tol, context)
    assert out[2][row, 0].abs().max() > 1e4, f"the floored sentence's gradient should be ~1/ε [{context}]"


def test_local_loss_fewer_than_two_texts() -> None:
    """No text with a sentence: a zero with zero gradients; one text: 0 (its pair is certain)."""
    beats = torch.randn(5, 10, 16, device=DEVICE, requires_grad=True)
    sentences = torch.randn(5, 4, 16, device=DEVICE, requires_grad=True)
    for counts, name in ((torch.zeros(5, dtype=torch.long), "none"), (torch.tensor([0, 0, 3, 0, 0]), "one")):
        loss = local.local_contrastive_loss(beats, sentences, counts.to(DEVICE), impl="triton")
        grads = torch.autograd.grad(loss, [beats, sentences])
        assert loss.item() == 0.0 and loss.dtype == torch.float32, name
        assert all(torch.equal(g, torch.zeros_like(g)) for g in grads), name


def test_local_loss_auto_dispatch_and_validation() -> None:
    beats, sentences, counts = _inputs(5, 10, 4, 16, torch.float32, scale=0.5)
    loss = kernels.local_contrastive_loss(beats, sentences, counts)
    expected = reference.local_contrastive_loss(beats, sentences, counts)
    if DEVICE == "cpu":  # "auto" on CPU tensors is the reference, bit for bit
        assert torch.equal(loss, expected)
    else:
        assert_rel_close("loss", loss, expected, TOLERANCES[torch.float32][0], "auto on CUDA")
    with pytest.raises(ValueError, match="float64"):
        local.local_contrastive_loss(beats.double(), sentences.double(), counts, impl="triton")
    with pytest.raises(ValueError, match="D <= 512"):
        local.local_contrastive_loss(torch.randn(3, 2, 600, device=DEVICE), torch.randn(3, 2, 600, device=DEVICE),
                                     torch.ones(3, dtype=torch.long, device=DEVICE), impl="triton")
    with pytest.raises(ValueError, match="Qb, S <= 64"):
        local.local_contrastive_loss(torch.randn(3, 70, 16, device=DEVICE), torch.randn(3, 2, 16, device=DEVICE),
                                     torch.ones(3, dtype=torch.long, device=DEVICE), impl="triton")
    with pytest.raises(ValueError, match="sentence_counts"):
        local.local_contrastive_loss(beats, sentences, counts[:3], impl="triton")


def test_local_loss_non_contiguous_int32_counts() -> None:
    """A strided int32 sentence_counts view (issue 16, 4a): the kernels read counts[i] at stride 1,
    so before the fix they saw the interleaved column (here 2³⁰: out-of-range sentence loads)."""
    seed = fresh_seed()
    beats, sentences, counts = _inputs(6, 10, 7, 32, torch.float32, scale=32**-0.25)
    interleaved = torch.stack([counts.to(torch.int32), torch.full_like(counts, 2**30, dtype=torch.int32)], dim=1)
    strided = interleaved[:, 0]
    assert not strided.is_contiguous() and strided.dtype == torch.int32
    grad_out = torch.tensor(1.1, device=DEVICE)
    out = _triton_grads(beats, sentences, strided, grad_out)
    ref = _reference_grads(beats, sentences, counts, grad_out)
    loss_tol, grad_tol = TOLERANCES[torch.float32]
    context = f"seed={seed} counts={counts.tolist()}"
    for name, value, expected, tol in zip(("loss", "dbeats", "dsentences"), out, ref, (loss_tol, grad_tol, grad_tol)):
        assert_rel_close(name, value, expected, tol, context)


def test_local_loss_double_backward_raises() -> None:
    """The backward is not differentiable: a second derivative must raise, not be silently wrong."""
    beats, sentences, counts = _inputs(4, 10, 3, 16, torch.float32, scale=0.5)
    inputs = [v.requires_grad_() for v in (beats, sentences)]
    loss = local.local_contrastive_loss(*inputs, counts, impl="triton")
    grads = torch.autograd.grad(loss, inputs, create_graph=True)
    with pytest.raises(RuntimeError, match="(?i)autograd|differentiab"):  # wording varies by torch version
        torch.autograd.grad(grads[0].sum() + grads[1].sum(), inputs)


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_local_loss_compiles_fullgraph(impl: str) -> None:
    """No host sync or data-dependent shape: the loss traces with fullgraph=True, forward and
    backward (AOTAutograd; aot_eager backend: the capture is tested, no C++ compiler needed)."""
    seed = fresh_seed()
    beats, sentences, counts = _inputs(5, 10, 4, 16, torch.float32, scale=0.5)
    torch._dynamo.reset()
    compiled = torch.compile(
        lambda b, s, c: local.local_contrastive_loss(b, s, c, T1, T2, T3, impl=impl), fullgraph=True,
        backend="aot_eager")
    inputs = [v.detach().clone().requires_grad_() for v in (beats, sentences)]
    loss = compiled(*inputs, counts)
    loss.backward()
    out = [loss.detach(), inputs[0].grad, inputs[1].grad]
    ref = _reference_grads(beats, sentences, counts, torch.tensor(1.0, device=DEVICE))
    loss_tol, grad_tol = TOLERANCES[torch.float32]
    for name, value, expected, tol in zip(("loss", "dbeats", "dsentences"), out, ref, (loss_tol, grad_tol, grad_tol)):
        assert_rel_close(name, value, expected, tol, f"seed={seed} compiled {impl}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_local_loss_cuda_configs_low_precision(dtype: torch.dtype) -> None:
    """bf16 and fp16 through the launch configurations a GPU runs, against float64 (issue 16,
    item 5); on CPU under the interpreter's bf16 shim. Qb = 10, S = 9, D = 48: every tile padded."""
    with gpu_numerics() if DEVICE == "cpu" else contextlib.nullcontext():
        _check(7, 10, 9, 48, dtype, scale=48**-0.25)


def test_local_loss_backward_in_text_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The backward's per-pair factors are bounded by FACTOR_BYTES: texts go in chunks (here 2
    texts of 7 per launch, the last chunk short), with the same result."""
    beats_per_ecg, max_sentences, batch = 10, 5, 7
    per_text = batch * (beats_per_ecg * max_sentences + beats_per_ecg**2 + max_sentences) * 4
    monkeypatch.setattr(local, "FACTOR_BYTES", 2 * per_text)
    assert local._text_chunk(batch, beats_per_ecg, max_sentences) == 2
    _check(batch, beats_per_ecg, max_sentences, 16, torch.float32, scale=0.5)


def test_local_loss_near_zero_keeps_relative_accuracy() -> None:
    """A confident batch (each text's own ECG scores far above the rest): the loss, ~1e-9, is formed
    from differences M_ji − M_jj and log1p, so fp32 keeps its relative accuracy (lse − diagonal
    would cancel to 0 in fp32). Checked on the shared loss head against float64."""
    seed = fresh_seed()
    similarity = 6.0 + torch.rand(6, 6, dtype=torch.float64) + torch.eye(6, dtype=torch.float64) * 2.5
    keep = torch.tensor([True, True, False, True, True, True])
    expected = reference.local_loss_from_similarity(similarity, keep, T3)
    loss = reference.local_loss_from_similarity(similarity.float(), keep, T3)
    assert 0 < expected < 1e-6, f"seed={seed}: the case should be confident, loss {expected:.3g}"
    assert_rel_close("loss", loss, expected, 1e-4, f"seed={seed}")
