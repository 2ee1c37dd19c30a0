"""PyTorch references of the three fused ops: the specification the kernels are tested against.

Each function has the signature of the public op (without ``impl``), validates its inputs
the same way, computes in float32 (float64 when any input is float64) whatever the input
dtype, and is written for clarity, not speed. The math and its gradients are in the docstrings
of ``kernels.infonce``, ``kernels.local_contrastive`` and ``kernels.attention_pool``; the losses
are those of the MELP paper.

attention_pool(queries (Q, D) | (B, Q, D), keys (B, N, D), values (B, N, D), num_heads,
               key_padding_mask (B, N) bool | None) -> (B, Q, D), dtype of values
    per head h (d = D / num_heads): softmax(q_h k_hᵀ / √d, masked keys -> −∞) v_h.
local_contrastive_loss(beats (B, Qb, D), sentences (B, S, D), sentence_counts (B,) int,
                       t1, t2, t3, positive_ids (B,) int | None) -> 0-d, float32 | float64
    pairs whose text has no sentence are dropped from both sides of M (B' = kept pairs).
infonce_loss(x (N, D), t (N, D), logit_scale 0-d, group, positive_ids (N,) int | None)
        -> 0-d, float32 | float64
    ½ [CE(s·X·Tᵀ, I) + CE(s·T·Xᵀ, I)], s = exp(logit_scale); with a process group, local
    rows against gathered columns (open_clip's local loss with gather-with-gradient).

Multi-positive targets (``positive_ids``, e.g. a hash of each report): the identity target I
becomes the soft target T_ij = [id_i = id_j] / #{j : id_j = id_i} in both directions (rows
and columns), so pairs with identical reports are each other's positives, not negatives.
All ids distinct gives I back.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from kernels._utils import (
    compute_dtype,
    validate_attention_pool,
    validate_infonce,
    validate_local_contrastive,
    validate_positive_ids,
)

COSINE_EPS = 1e-8  # floor on each norm in the beat-sentence cosine (a zero vector gives cos 0)


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's (N_l, D) rows; backward sums the gradient over ranks, keeps ours."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        num_local = grad.shape[0] // dist.get_world_size(ctx.group)
        rank = dist.get_rank(ctx.group)
        return grad[rank * num_local:(rank + 1) * num_local], None


def attention_pool(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    num_heads: int,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multi-head softmax(q·kᵀ/√d)·v of learned or per-sample queries over keys; (B, Q, D)."""
    validate_attention_pool(queries, keys, values, num_heads, key_padding_mask)
    dtype = compute_dtype(queries, keys, values)
    batch, num_keys, dim = keys.shape
    head_dim = dim // num_heads
    if queries.ndim == 2:
        queries = queries.unsqueeze(0).expand(batch, -1, -1)
    num_queries = queries.shape[1]
    q = queries.to(dtype).reshape(batch, num_queries, num_heads, head_dim).transpose(1, 2)  # (B, H, Q, d)
    k = keys.to(dtype).reshape(batch, num_keys, num_heads, head_dim).transpose(1, 2)  # (B, H, N, d)
    v = values.to(dtype).reshape(batch, num_keys, num_heads, head_dim).transpose(1, 2)  # (B, H, N, d)
    scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)  # (B, H, Q, N)
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v  # (B, H, Q, d)
    return out.transpose(1, 2).reshape(batch, num_queries, dim).to(values.dtype)


def local_similarity(
    beats: torch.Tensor, sentences: torch.Tensor, sentence_counts: torch.Tensor, t1: float, t2: float
) -> torch.Tensor:
    """R[i, j] = log Σ_k exp(t2·cos(s_ik, c_ijk)) for text i against ECG j; (B, B).

    Sentence slots at or past a text's count are zeroed. A text with no sentence is scored
    as one zero sentence (cos = 0 by the norm floor, R = 0): finite, and ``local_loss_from_similarity``
    leaves such pairs out, so no host-side filtering (no data-dependent shapes) is needed.
    """
    num_sentences = sentences.shape[1]
    slots = torch.arange(num_sentences, device=sentences.device)[None, :]
    present = slots < sentence_counts[:, None]  # (B, S)
    valid = slots < sentence_counts.clamp_min(1)[:, None]  # slot 0 stands in for an empty text
    sentences = sentences * present[:, :, None]
    scores = torch.einsum("jqd,ikd->ijqk", beats, sentences)  # (B_text, B_ecg, Qb, S)
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    first = torch.softmax(scores, dim=-1)  # a_qk, over sentences
    second = torch.softmax(t1 * first, dim=-2)  # α_kq, over beats
    context = torch.einsum("ijqk,jqd->ijkd", second, beats)  # c_k: (B_text, B_ecg, S, D)
    dots = torch.einsum("ikd,ijkd->ijk", sentences, context)
    norms = sentences.norm(dim=-1).clamp_min(COSINE_EPS)[:, None, :] * context.norm(dim=-1).clamp_min(COSINE_EPS)
    cosine = (dots / norms).masked_fill(~valid[:, None, :], float("-inf"))  # (B_text, B_ecg, S)
    return torch.logsumexp(t2 * cosine, dim=-1)


def _cross_entropy_terms(logits: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Per row j: log Σ_{i ∈ candidates_j} exp(L_ji) − L_jj = log1p(Σ_{i≠j} exp(L_ji − L_jj)).

    Formed from the differences L_ji − L_jj and log1p, never as lse − diagonal: near zero the
    term keeps its relative accuracy (lse − diagonal cancels to 0 in fp32 at a margin of ~17).
    ``candidates`` (bool, the shape of ``logits``) excludes entries; a row without candidates
    other than its diagonal gives 0 (gradient 0, no NaN).
    """
    eye = torch.eye(logits.shape[0], dtype=torch.bool, device=logits.device)
    gaps = torch.where(candidates & ~eye, logits - logits.diagonal()[:, None], float("-inf"))
    top = gaps.amax(dim=1, keepdim=True).detach()  # any shift is exact; detached: no inf − inf in autograd
    top = torch.where(torch.isfinite(top), top, 0.0)
    total = torch.exp(gaps - top).sum(dim=1)  # Σ exp(gap − top), 0 for a row without candidates
    top = top.squeeze(1)
    high, low = top.clamp_min(0.0), top.clamp_max(0.0)  # each branch stays finite (and so its gradient)
    return torch.where(top > 0, high + torch.log(torch.exp(-high) + total), torch.log1p(total * torch.exp(low)))


def _positive_gaps(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Per row j: L_jj − mean_{i ∈ positives_j} L_ji, exactly 0 when row j's only positive is j
    (the soft-target cross entropy is the one-positive term plus this gap)."""
    mean = torch.where(positives, logits, 0.0).sum(dim=1) / positives.sum(dim=1).clamp_min(1)
    return logits.diagonal() - mean


def local_loss_from_similarity(
    similarity: torch.Tensor, keep: torch.Tensor, t3: float, positive_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """½[CE(M, I) + CE(Mᵀ, I)] over the kept pairs, M[j, i] = t3·R(i, j), without host syncs.

    Rows and columns of dropped pairs are masked out (their entries get exactly zero gradient);
    each cross entropy is a sum of per-row terms log1p(Σ_{i≠j} exp(M_ji − M_jj)) (no
    Σlse − Σdiag cancellation) divided by B' = keep.sum(); B' = 0 gives 0, B' = 1 gives 0.
    With ``positive_ids`` (B,) the target of row j is uniform over the kept i with
    id_i = id_j (columns alike): each term gains M_jj − mean of those M_ji, exactly 0 for
    distinct ids (the one-positive loss bit for bit).
    """
    logits = t3 * similarity.transpose(0, 1)  # M[j, i]
    pair = keep[:, None] & keep[None, :]
    rows = _cross_entropy_terms(logits, pair)
    cols = _cross_entropy_terms(logits.transpose(0, 1), pair)
    if positive_ids is not None:
        positives = pair & (positive_ids[:, None] == positive_ids[None, :])  # symmetric
        rows = rows + _positive_gaps(logits, positives)
        cols = cols + _positive_gaps(logits.transpose(0, 1), positives)
    rows = torch.where(keep, rows, 0.0)
    cols = torch.where(keep, cols, 0.0)
    return 0.5 * (rows.sum() + cols.sum()) / keep.sum().clamp_min(1)


def local_contrastive_loss(
    beats: torch.Tensor,
    sentences: torch.Tensor,
    sentence_counts: torch.Tensor,
    t1: float = 4.0,
    t2: float = 5.0,
    t3: float = 10.0,
    positive_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The MELP paper's local beat-sentence loss ½[CE(M, I) + CE(Mᵀ, I)], M[j, i] = t3·R(i, j)
    (multi-positive soft targets with ``positive_ids``: see ``local_loss_from_similarity``).

    Pairs (text i, ECG i) whose text has no sentence are removed from both sides of M, so
    the B' remaining pairs stay aligned on the diagonal. With B' = 0 the loss is a zero
    that is still connected to ``beats`` and ``sentences`` (zero gradients). No host sync:
    the dropped pairs are masked, not indexed away.
    """
    validate_local_contrastive(beats, sentences, sentence_counts)
    validate_positive_ids("local_contrastive_loss", positive_ids, beats.shape[0], beats.device)
    dtype = compute_dtype(beats, sentences)
    similarity = local_similarity(beats.to(dtype), sentences.to(dtype), sentence_counts, t1, t2)  # R[i, j]
    return local_loss_from_similarity(similarity, sentence_counts > 0, t3, positive_ids)


def infonce_loss(
    x: torch.Tensor,
    t: torch.Tensor,
    logit_scale: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    positive_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE of L2-normalised x (N, D) against t (N, D) at scale exp(logit_scale).

    ``positive_ids`` (N,) int (this rank's rows): soft targets, uniform over the (gathered)
    columns with the row's id, in both directions (explicit soft-target cross entropy).

    With ``group``, each rank passes its own N_l rows; x and t are all-gathered with
    gradient and the rank's loss is ½[CE(s·x_r·Tᵀ, I + o) + CE(s·t_r·Xᵀ, I + o)],
    o = rank·N_l. The mean over ranks is the full-batch loss; every rank's features get
    W·∂L/∂(features) and logit_scale its rank's share, so averaging gradients over
    ranks (DDP / DeepSpeed) gives every parameter exactly ∂L/∂θ.
    """
    validate_infonce(x, t, logit_scale)
    validate_positive_ids("infonce_loss", positive_ids, x.shape[0], x.device)
    dtype = compute_dtype(x, t, logit_scale)
    x, t = x.to(dtype), t.to(dtype)
    scale = logit_scale.to(dtype).exp()
    if group is None:
        logits = scale * x @ t.T  # (N, N)
        if positive_ids is not None:
            targets = _soft_targets(positive_ids, positive_ids, dtype)
            return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))
        labels = torch.arange(x.shape[0], device=x.device)
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    rank = dist.get_rank(group)
    all_x = _AllGatherWithGrad.apply(x, group)  # (N, D), gradient flows back to the owner
    all_t = _AllGatherWithGrad.apply(t, group)
    labels = torch.arange(x.shape[0], device=x.device) + rank * x.shape[0]
    logits_x = scale * x @ all_t.T  # (N_l, N)
    logits_t = scale * t @ all_x.T  # (N_l, N)
    if positive_ids is not None:
        parts = [torch.empty_like(positive_ids) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, positive_ids.contiguous(), group=group)
        labels = _soft_targets(positive_ids, torch.cat(parts), dtype)  # (N_l, N), global counts
    return 0.5 * (F.cross_entropy(logits_x, labels) + F.cross_entropy(logits_t, labels))


def _soft_targets(row_ids: torch.Tensor, col_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """T_ij = [row_id_i = col_id_j] / #{j : col_id_j = row_id_i}: (len(row_ids), len(col_ids))."""
    same = (row_ids[:, None] == col_ids[None, :]).to(dtype)
    return same / same.sum(1, keepdim=True)
