"""Multi-positive targets (identical reports are each other's positives) in both contrastive losses.

The expected values are an explicit soft-target cross entropy written here in float64 from the
definition (target of row i uniform over the columns with the same id, columns alike), not the
library's code: the reference (float64) and the Triton ops (CPU: the interpreter) are compared
with it, loss and the gradients of every input, at odd sizes with many repeated ids. All ids
distinct must give the single-positive loss back exactly. A 2-rank gloo run checks the
distributed InfoNCE (gathered ids, global counts) against the full batch.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import math

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

import kernels.infonce
import kernels.local_contrastive
from kernels import reference
from tests.kernel_utils import (
    INTERPRETER_HINT,
    assert_rel_close,
    free_port,
    fresh_seed,
    use_triton_interpreter,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
infonce = kernels.infonce if DEVICE == "cuda" else use_triton_interpreter(kernels.infonce)
local = kernels.local_contrastive if DEVICE == "cuda" else use_triton_interpreter(kernels.local_contrastive)
T1, T2, T3 = 4.0, 5.0, 10.0
FP32_TOL = 5e-5  # the single-positive tests' fp32 gradient tolerances (3×TF32 / fp32 dots on S)


@pytest.fixture(autouse=True)
def _kernels_runnable() -> None:
    if infonce is None or local is None:
        pytest.fail(INTERPRETER_HINT)


def _unit_rows(num_rows: int, dim: int) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(num_rows, dim, dtype=torch.float64), dim=-1).float()


def _soft_ce(logits: torch.Tensor, row_ids: torch.Tensor, col_ids: torch.Tensor) -> torch.Tensor:
    """Mean over rows of −Σ_j T_ij log softmax_j(logits_i), T_ij = [id_i = id_j] / #{j : id_j = id_i}."""
    same = (row_ids[:, None] == col_ids[None, :]).double()
    targets = same / same.sum(1, keepdim=True)
    return -(targets * torch.log_softmax(logits, dim=1)).sum(1).mean()


def _explicit_infonce(x, t, logit_scale, ids, grad_out):
    inputs = [v.detach().double().requires_grad_() for v in (x, t, logit_scale)]
    logits = inputs[2].exp() * inputs[0] @ inputs[1].T
    loss = 0.5 * (_soft_ce(logits, ids, ids) + _soft_ce(logits.T, ids, ids))
    return [loss.detach(), *torch.autograd.grad(loss, inputs, grad_out.double())]


def _grads(loss_fn, tensors, grad_out, **kwargs):
    inputs = [v.detach().clone().requires_grad_() for v in tensors]
    loss = loss_fn(*inputs, **kwargs)
    return [loss.detach(), *torch.autograd.grad(loss, inputs, grad_out.to(loss.dtype))]


def _repeated_ids(num_rows: int, distinct: int) -> torch.Tensor:
    ids = torch.randint(0, distinct, (num_rows,)) * 7_919 + (1 << 62)  # large int64 values, many repeats
    ids[-1] = -5  # a singleton
    return ids


@pytest.mark.parametrize("num_rows,dim", [(37, 40), (67, 72)])
def test_infonce_multi_positive_matches_explicit(num_rows: int, dim: int) -> None:
    seed = fresh_seed()
    x, t = _unit_rows(num_rows, dim), _unit_rows(num_rows, dim)
    ids = _repeated_ids(num_rows, 6)
    logit_scale, grad_out = torch.tensor(math.log(50.0)), torch.tensor(-0.7)
    expected = _explicit_infonce(x, t, logit_scale, ids, grad_out)
    context = f"seed={seed} N={num_rows} D={dim}"
    ref = _grads(reference.infonce_loss, (x.double(), t.double(), logit_scale.double()), grad_out,
                 positive_ids=ids)
    out = _grads(infonce.infonce_loss, (x, t, logit_scale), grad_out, impl="triton", positive_ids=ids)
    for name, r, o, e in zip(("loss", "dx", "dt", "dlogit_scale"), ref, out, expected):
        assert_rel_close(f"reference {name}", r, e, 1e-12, context)
        assert_rel_close(f"triton {name}", o.double(), e, 1e-5 if name == "loss" else FP32_TOL, context)
    # the targets matter: the one-positive loss differs
    single = reference.infonce_loss(x.double(), t.double(), logit_scale.double())
    assert abs(single.item() - expected[0].item()) > 1e-3


def test_distinct_ids_equal_single_positive() -> None:
    seed = fresh_seed()
    x, t = _unit_rows(45, 48), _unit_rows(45, 48)
    logit_scale, grad_out = torch.tensor(math.log(100.0)), torch.tensor(1.3)
    ids = torch.randperm(45) * 1_000_003
    plain = _grads(infonce.infonce_loss, (x, t, logit_scale), grad_out, impl="triton")
    multi = _grads(infonce.infonce_loss, (x, t, logit_scale), grad_out, impl="triton", positive_ids=ids)
    for name, a, b in zip(("loss", "dx", "dt", "dlogit_scale"), plain, multi):
        assert torch.equal(a, b), f"seed={seed} triton {name}: distinct ids changed the result"
    args = (x.double(), t.double(), logit_scale.double())
    plain = _grads(reference.infonce_loss, args, grad_out)
    multi = _grads(reference.infonce_loss, args, grad_out, positive_ids=ids)
    for name, a, b in zip(("loss", "dx", "dt", "dlogit_scale"), plain, multi):
        assert_rel_close(f"reference {name}", b, a, 1e-13, f"seed={seed} distinct ids")
    # the local loss's similarity-to-loss step (shared by its reference and kernel paths)
    similarity = torch.randn(9, 9, dtype=torch.float64)
    keep = torch.tensor([True] * 4 + [False] + [True] * 4)
    single = reference.local_loss_from_similarity(similarity, keep, T3)
    assert torch.equal(single, reference.local_loss_from_similarity(similarity, keep, T3, torch.arange(9)))


def _local_inputs(batch: int, beats: int, sentences: int, dim: int):
    counts = torch.randint(1, sentences + 1, (batch,))
    counts[2] = 0  # a text without sentences: dropped from both sides of M
    b = torch.randn(batch, beats, dim)
    s = torch.randn(batch, sentences, dim) * (torch.arange(sentences)[None, :, None] < counts[:, None, None])
    return b, s, counts


def _explicit_local(beats, sentences, counts, ids, grad_out):
    inputs = [v.detach().double().requires_grad_() for v in (beats, sentences)]
    similarity = reference.local_similarity(*inputs, counts, T1, T2)  # R[i, j], tested in test_local_contrastive
    kept = (counts > 0).nonzero().flatten()
    logits = T3 * similarity.T[kept][:, kept]  # M[j, i] over the kept pairs
    loss = 0.5 * (_soft_ce(logits, ids[kept], ids[kept]) + _soft_ce(logits.T, ids[kept], ids[kept]))
    return [loss.detach(), *torch.autograd.grad(loss, inputs, grad_out.double())]


def test_local_multi_positive_matches_explicit() -> None:
    seed = fresh_seed()
    beats, sentences, counts = _local_inputs(11, 5, 4, 24)
    ids = torch.tensor([3, 9, 3, 3, 1, 9, 3, 7, 1, 9, 5])  # id 3 includes the dropped pair 2
    grad_out = torch.tensor(0.6)
    expected = _explicit_local(beats, sentences, counts, ids, grad_out)
    context = f"seed={seed} B=11"
    ref = _grads(reference.local_contrastive_loss, (beats.double(), sentences.double()), grad_out,
                 sentence_counts=counts, positive_ids=ids)
    out = _grads(local.local_contrastive_loss, (beats, sentences), grad_out, sentence_counts=counts,
                 impl="triton", positive_ids=ids)
    for name, r, o, e in zip(("loss", "dbeats", "dsentences"), ref, out, expected):
        assert_rel_close(f"reference {name}", r, e, 1e-12, context)
        assert_rel_close(f"triton {name}", o.double(), e, 1e-5 if name == "loss" else FP32_TOL, context)


def test_positive_ids_validation() -> None:
    x = _unit_rows(4, 8)
    scale = torch.tensor(1.0)
    with pytest.raises(ValueError, match="integer"):
        infonce.infonce_loss(x, x, scale, impl="triton", positive_ids=torch.zeros(4))
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        reference.infonce_loss(x, x, scale, positive_ids=torch.zeros(3, dtype=torch.int64))
    beats, sentences, counts = _local_inputs(4, 2, 3, 8)
    with pytest.raises(ValueError, match="local_contrastive_loss: positive_ids"):
        local.local_contrastive_loss(beats, sentences, counts, positive_ids=torch.zeros(5, dtype=torch.int64))


WORLD_SIZE = 2
ROWS_PER_RANK = 13


def _distributed_worker(rank: int, port: int, x, t, logit_scale, ids, grad_out, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        rows = slice(rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK)
        results = {}
        for impl in ("reference", "triton"):
            inputs = [x[rows].clone().requires_grad_(), t[rows].clone().requires_grad_(),
                      logit_scale.clone().requires_grad_()]
            loss = infonce.infonce_loss(*inputs, group=dist.group.WORLD, impl=impl, positive_ids=ids[rows])
            results[impl] = [loss.detach(), *torch.autograd.grad(loss, inputs, grad_out)]
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_infonce_multi_positive_distributed(tmp_path) -> None:
    seed = fresh_seed()
    num_rows = WORLD_SIZE * ROWS_PER_RANK
    x, t = _unit_rows(num_rows, 32), _unit_rows(num_rows, 32)
    ids = _repeated_ids(num_rows, 5)  # repeats within and across ranks
    logit_scale, grad_out = torch.tensor(math.log(30.0)), torch.tensor(0.9)
    mp.spawn(_distributed_worker, args=(free_port(), x, t, logit_scale, ids, grad_out, str(tmp_path)),
             nprocs=WORLD_SIZE, join=True)
    per_rank = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]
    full = _explicit_infonce(x, t, logit_scale, ids, grad_out)
    for impl in ("reference", "triton"):
        losses, dxs, dts, dscales = zip(*(result[impl] for result in per_rank))
        context = f"seed={seed} impl={impl}"
        # mean loss = L; features get W·∂L/∂f; the logit-scale shares sum to W·mean = autograd's
        assert_rel_close("mean loss", torch.stack(losses).mean().double(), full[0], 1e-5, context)
        assert_rel_close("dx", torch.cat(dxs).double() / WORLD_SIZE, full[1], FP32_TOL, context)
        assert_rel_close("dt", torch.cat(dts).double() / WORLD_SIZE, full[2], FP32_TOL, context)
        assert_rel_close("mean dlogit_scale", torch.stack(dscales).mean().double(), full[3], FP32_TOL, context)


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_multi_positive_compiles_fullgraph(impl: str) -> None:
    """No host sync or data-dependent shape: the soft targets capture in torch.compile(fullgraph=True)."""
    seed = fresh_seed()
    torch._dynamo.reset()
    x, t = _unit_rows(21, 16), _unit_rows(21, 16)
    ids = _repeated_ids(21, 4)
    logit_scale, grad_out = torch.tensor(math.log(20.0)), torch.tensor(1.0)

    def step(x, t, logit_scale, ids):
        return infonce.infonce_loss(x, t, logit_scale, impl=impl, positive_ids=ids)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = _grads(lambda *a: compiled(*a, ids), (x, t, logit_scale), grad_out)
    expected = _explicit_infonce(x, t, logit_scale, ids, grad_out)
    for name, o, e in zip(("loss", "dx", "dt", "dlogit_scale"), out, expected):
        assert_rel_close(name, o.double(), e, FP32_TOL, f"seed={seed} impl={impl} compiled")


def test_identical_text_embeddings_make_the_targets_equivalent() -> None:
    """When copies of a report have identical text embeddings (a deterministic text tower), the
    one-positive loss already equals the multi-positive one, and so do the gradients of x and of
    the shared text embedding (summed over copies): the targets only matter once the copies'
    embeddings differ, e.g. under the text model's dropout (benchmarks/multi_positive.py)."""
    seed = fresh_seed()
    ids = _repeated_ids(23, 5)
    table = {int(i): row for i, row in zip(ids.unique(), _unit_rows(len(ids.unique()), 12).double())}
    t = torch.stack([table[int(i)] for i in ids])
    x = _unit_rows(23, 12).double()
    logit_scale = torch.tensor(math.log(30.0), dtype=torch.float64)
    grad_out = torch.tensor(1.0)
    plain = _grads(reference.infonce_loss, (x, t, logit_scale), grad_out)
    multi = _grads(reference.infonce_loss, (x, t, logit_scale), grad_out, positive_ids=ids)
    context = f"seed={seed}"
    assert_rel_close("loss", multi[0], plain[0], 1e-12, context)
    assert_rel_close("dx", multi[1], plain[1], 1e-12, context)
    groups = (ids[:, None] == ids.unique()[None, :]).double()  # (N, groups): per-copy -> shared gradient
    assert_rel_close("d shared t", groups.T @ multi[2], groups.T @ plain[2], 1e-12, context)
    assert not torch.allclose(multi[2], plain[2])  # per copy they differ
