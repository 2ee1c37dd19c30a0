"""Fused local beat-sentence contrastive loss (METHOD.md §3 "Local"): Triton forward and backward.

Math (KERNELS.md §2), text i with sentences s_k (k < S_i), ECG j with beats b_q (q < Qb):

    A_qk = ⟨b_q, s_k⟩             a_qk = softmax_k(A_qk)          α_kq = softmax_q(τ1·a_qk)
    c_k  = Σ_q α_kq b_q           cos_k = ⟨s_k, c_k⟩ / (max(‖s_k‖, ε)·max(‖c_k‖, ε)),  ε = 1e-8
    R(i, j) = log Σ_k exp(τ2·cos_k)     M[j, i] = τ3·R(i, j)     L = ½ [CE(M, I) + CE(Mᵀ, I)]

c_k is never formed: with the beats' Gram matrix G = b·bᵀ (Qb × Qb) and H = G·α (H_qk = ⟨b_q, c_k⟩),
⟨s_k, c_k⟩ = Σ_q α_kq A_qk and ‖c_k‖² = Σ_q α_kq H_qk, so a pair costs one Qb×S×D product (A)
and a Qb×Qb×S one (H). Gradient of a pair from dR = ∂L/∂R(i, j), with w = softmax_k(τ2·cos):

    dcos_k = τ2·w_k·dR      u_qk = α_kq·dcos_k / (‖s_k‖‖c_k‖)      v_qk = α_kq·dcos_k·cos_k / ‖c_k‖²
    dα_kq  = dcos_k·(A_qk / (‖s_k‖‖c_k‖) − cos_k·H_qk / ‖c_k‖²)    (= ⟨dc_k, b_q⟩)
    dA     = a ∘ (τ1·dE − rowsum_k(a ∘ τ1·dE)),   dE = α ∘ (dα − colsum_q(α ∘ dα))
    T = u + dA:   ∂L/∂b_j = Σ_i T_ij·s_i − (Σ_i v_ij·α_ijᵀ)·b_j
                  ∂L/∂s_i = Σ_j T_ijᵀ·b_j − (Σ_j dcos_k·cos_k / ‖s_k‖²)_k ∘ s_i
(the norm terms are dropped where a norm is under its ε floor, as autograd of the clamp does).

Shapes: beats (B, Qb, D), sentences (B, S, D) zero-padded, sentence_counts (B,) int; Qb, S ≤ 64,
D ≤ 512. Texts with no sentence and their ECGs are dropped from both sides of M before the
kernels (B' pairs remain, aligned on the diagonal); B' = 0 gives a zero that keeps the
autograd graph (zero gradients), B' = 1 gives 0 (the positive is the only candidate) — the
rules of ``kernels.reference.local_contrastive_loss``. Sentences are trimmed to max S_i.

Kernels (R, B' × B' fp32 and saved for the backward, is the only B²-sized tensor):
    _local_gram_kernel          per ECG j: G_j = b_j·b_jᵀ (B', BLOCK_Q, BLOCK_Q) fp32.
    _local_fwd_kernel           per (text i, block of ECGs): s_i and ‖s_i‖ resident, beats
                                streamed; writes R(i, j).
    _local_bwd_sentence_kernel  per text i, looping over ECGs: recompute the pair, ∂L/∂s_i.
    _local_bwd_beat_kernel      per ECG j, looping over texts: recompute the pair, ∂L/∂b_j.
The symmetric cross entropy on M = τ3·Rᵀ is plain torch (B'² floats); its gradient dR feeds
the backward kernels, which use the saved R (log-sum-exp over sentences) to form w.

Numerics: every product is accumulated in fp32; A (and G) take the input dtype's operands
(fp32 inputs: 3×TF32 dots, near-fp32 accuracy); everything after A is fp32: the backward's
D-wide products run on fp32 operands (3×TF32), since dR ~ 1/B'² would underflow in fp16, and
the small Qb × Qb ones (G·α, v·αᵀ) are exact fp32 FMAs. Gradients are returned in the input
dtype. Registers (sm_90, Triton 3.9, checked with ptxas): no spills at bf16, S ≤ 32, D ≤ 256;
wider tiles (D = 512, S = 64, or fp32 inputs) spill some registers: correct, slower.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import reference
from kernels._utils import (
    Impl,
    contiguous,
    dot_precision,
    feature_block,
    next_power_of_2,
    require_interpreted,
    resolve_impl,
    validate_local_contrastive,
)

OP = "local_contrastive_loss"
MAX_BLOCK_D = 512
MAX_BLOCK_QS = 64  # beats per ECG and sentences per text, padded: tiles are (BLOCK_Q, BLOCK_S)
COSINE_EPS = 1e-8  # the kernels spell it as a literal (a jit function reads no Python globals)
assert COSINE_EPS == reference.COSINE_EPS


@triton.jit
def _local_gram_kernel(
    beats_ptr, gram_ptr, num_beats, dim,
    stride_bb, stride_bq, stride_gb,
    BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # G_j = b_j·b_jᵀ, zero outside q, q' < Qb
    j = tl.program_id(0).to(tl.int64)
    offs_q = tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, BLOCK_D)
    b = tl.load(
        beats_ptr + j * stride_bb + offs_q[:, None] * stride_bq + offs_d[None, :],
        mask=(offs_q[:, None] < num_beats) & (offs_d[None, :] < dim), other=0.0,
    )
    gram = tl.dot(b, tl.trans(b), input_precision=DOT_PRECISION)  # (BLOCK_Q, BLOCK_Q)
    tl.store(gram_ptr + j * stride_gb + offs_q[:, None] * BLOCK_Q + offs_q[None, :], gram)


@triton.jit
def _local_pair_forward(b, s, gram, s_norm, beat_valid, sentence_valid, t1, DOT_PRECISION: tl.constexpr):
    # One (text, ECG) pair on (BLOCK_Q, BLOCK_S) tiles, rows q, columns k: returns A, a, α (as
    # α[q, k]), H = G·α, ‖c_k‖, 1/(max(‖s_k‖, ε)·max(‖c_k‖, ε)) and cos_k.
    scores = tl.dot(b, tl.trans(s), input_precision=DOT_PRECISION)  # A: (BLOCK_Q, BLOCK_S)
    first = tl.where(sentence_valid[None, :], scores, float("-inf"))
    first = tl.exp(first - tl.max(first, 1)[:, None])
    first = first / tl.sum(first, 1)[:, None]  # a_qk: softmax over sentences
    second = tl.where(beat_valid[:, None], t1 * first, float("-inf"))
    second = tl.exp(second - tl.max(second, 0)[None, :])
    second = second / tl.sum(second, 0)[None, :]  # α_kq: softmax over beats, 0 on padded beats
    h = tl.dot(gram, second, input_precision="ieee")  # H_qk = ⟨b_q, c_k⟩ (small: exact fp32 FMAs)
    dots = tl.sum(second * scores, 0)  # ⟨s_k, c_k⟩: (BLOCK_S,)
    c_norm = tl.sqrt(tl.maximum(tl.sum(second * h, 0), 0.0))
    inv_norms = 1.0 / (tl.maximum(s_norm, 1e-8) * tl.maximum(c_norm, 1e-8))
    cosine = dots * inv_norms
    return scores, first, second, h, c_norm, inv_norms, cosine


@triton.jit
def _local_pair_backward(scores, first, second, h, c_norm, inv_norms, cosine, lse, d_lse,
                         beat_valid, sentence_valid, t1, t2):
    # dcos_k = τ2·w_k·dR; returns T = u + dA and v (both (BLOCK_Q, BLOCK_S)) and dcos (BLOCK_S,)
    weight = tl.where(sentence_valid, tl.exp(t2 * cosine - lse), 0.0)
    d_cos = t2 * weight * d_lse
    c_floor = tl.maximum(c_norm, 1e-8)
    c_coef = tl.where(c_norm > 1e-8, cosine / (c_floor * c_floor), 0.0)
    d_second = d_cos[None, :] * (scores * inv_norms[None, :] - c_coef[None, :] * h)  # dα_kq
    d_e = second * (d_second - tl.sum(second * d_second, 0)[None, :])
    d_first = t1 * d_e
    d_scores = first * (d_first - tl.sum(first * d_first, 1)[:, None])  # dA_qk
    u = second * (d_cos * inv_norms)[None, :]
    v = second * (d_cos * c_coef)[None, :]
    valid = beat_valid[:, None] & sentence_valid[None, :]
    return tl.where(valid, u + d_scores, 0.0), tl.where(valid, v, 0.0), d_cos


@triton.jit
def _local_fwd_kernel(
    beats_ptr, sentences_ptr, counts_ptr, gram_ptr, lse_ptr,
    num_pairs, num_beats, dim, ecgs_per_program, t1, t2,
    stride_bb, stride_bq, stride_sb, stride_sk, stride_gb, stride_lse,
    BLOCK_Q: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # R(i, j) = log Σ_{k<S_i} exp(τ2·cos_k(i, j)) for text i = program_id(0), ECGs of block program_id(1)
    i = tl.program_id(0).to(tl.int64)
    j_start = tl.program_id(1) * ecgs_per_program
    j_end = tl.minimum(j_start + ecgs_per_program, num_pairs)
    offs_q = tl.arange(0, BLOCK_Q)
    offs_k = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < dim
    beat_valid = offs_q < num_beats
    sentence_valid = offs_k < tl.load(counts_ptr + i)
    s = tl.load(
        sentences_ptr + i * stride_sb + offs_k[:, None] * stride_sk + offs_d[None, :],
        mask=sentence_valid[:, None] & d_mask[None, :], other=0.0,
    )  # (BLOCK_S, BLOCK_D)
    s_float = s.to(tl.float32)
    s_norm = tl.sqrt(tl.sum(s_float * s_float, 1))
    b_mask = beat_valid[:, None] & d_mask[None, :]
    # pointers advance by one ECG per step (64-bit pointer arithmetic, no int32 index products)
    b_ptrs = beats_ptr + j_start.to(tl.int64) * stride_bb + offs_q[:, None] * stride_bq + offs_d[None, :]
    gram_ptrs = gram_ptr + j_start.to(tl.int64) * stride_gb + offs_q[:, None] * BLOCK_Q + offs_q[None, :]
    for j in range(j_start, j_end):
        b = tl.load(b_ptrs, mask=b_mask, other=0.0)
        gram = tl.load(gram_ptrs)
        b_ptrs += stride_bb
        gram_ptrs += stride_gb
        _, _, _, _, _, _, cosine = _local_pair_forward(
            b, s, gram, s_norm, beat_valid, sentence_valid, t1, DOT_PRECISION)
        logits = tl.where(sentence_valid, t2 * cosine, float("-inf"))
        m_i = tl.max(logits, 0)
        lse = m_i + tl.log(tl.sum(tl.exp(logits - m_i), 0))
        tl.store(lse_ptr + i * stride_lse + j, lse)


@triton.jit
def _local_bwd_sentence_kernel(
    beats_ptr, sentences_ptr, counts_ptr, gram_ptr, lse_ptr, d_lse_ptr, d_sentences_ptr,
    num_pairs, num_beats, num_sentences, dim, t1, t2,
    stride_bb, stride_bq, stride_sb, stride_sk, stride_gb, stride_lse, stride_dsb, stride_dsk,
    BLOCK_Q: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # ∂L/∂s_i = Σ_j T_ijᵀ·b_j − z ∘ s_i,  z_k = Σ_j dcos_k·cos_k / ‖s_k‖²  (0 where ‖s_k‖ ≤ ε)
    i = tl.program_id(0).to(tl.int64)
    offs_q = tl.arange(0, BLOCK_Q)
    offs_k = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < dim
    beat_valid = offs_q < num_beats
    sentence_valid = offs_k < tl.load(counts_ptr + i)
    s = tl.load(
        sentences_ptr + i * stride_sb + offs_k[:, None] * stride_sk + offs_d[None, :],
        mask=sentence_valid[:, None] & d_mask[None, :], other=0.0,
    )
    s_norm = tl.sqrt(tl.sum(s.to(tl.float32) * s.to(tl.float32), 1))
    b_mask = beat_valid[:, None] & d_mask[None, :]
    acc = tl.zeros([BLOCK_S, BLOCK_D], dtype=tl.float32)
    z = tl.zeros([BLOCK_S], dtype=tl.float32)
    b_ptrs = beats_ptr + offs_q[:, None] * stride_bq + offs_d[None, :]
    gram_ptrs = gram_ptr + offs_q[:, None] * BLOCK_Q + offs_q[None, :]
    for j in range(0, num_pairs):
        b = tl.load(b_ptrs, mask=b_mask, other=0.0)
        gram = tl.load(gram_ptrs)
        b_ptrs += stride_bb
        gram_ptrs += stride_gb
        lse = tl.load(lse_ptr + i * stride_lse + j)
        d_lse = tl.load(d_lse_ptr + i * stride_lse + j)
        scores, first, second, h, c_norm, inv_norms, cosine = _local_pair_forward(
            b, s, gram, s_norm, beat_valid, sentence_valid, t1, DOT_PRECISION)
        t, _, d_cos = _local_pair_backward(scores, first, second, h, c_norm, inv_norms, cosine, lse, d_lse,
                                           beat_valid, sentence_valid, t1, t2)
        acc += tl.dot(tl.trans(t), b.to(tl.float32), input_precision="tf32x3")  # (BLOCK_S, BLOCK_D)
        z += d_cos * cosine
    s_floor = tl.maximum(s_norm, 1e-8)
    z = tl.where(s_norm > 1e-8, z / (s_floor * s_floor), 0.0)
    d_s = acc - z[:, None] * s.to(tl.float32)  # cast again: no fp32 copy of s live across the loop
    tl.store(
        d_sentences_ptr + i * stride_dsb + offs_k[:, None] * stride_dsk + offs_d[None, :],
        d_s.to(d_sentences_ptr.dtype.element_ty), mask=(offs_k[:, None] < num_sentences) & d_mask[None, :],
    )


@triton.jit
def _local_bwd_beat_kernel(
    beats_ptr, sentences_ptr, counts_ptr, gram_ptr, lse_ptr, d_lse_ptr, d_beats_ptr,
    num_pairs, num_beats, dim, t1, t2,
    stride_bb, stride_bq, stride_sb, stride_sk, stride_gb, stride_lse, stride_dbb, stride_dbq,
    BLOCK_Q: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # ∂L/∂b_j = Σ_i T_ij·s_i − W·b_j,  W = Σ_i v_ij·α_ijᵀ  (BLOCK_Q × BLOCK_Q)
    j = tl.program_id(0).to(tl.int64)
    offs_q = tl.arange(0, BLOCK_Q)
    offs_k = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < dim
    beat_valid = offs_q < num_beats
    b_mask = beat_valid[:, None] & d_mask[None, :]
    b = tl.load(beats_ptr + j * stride_bb + offs_q[:, None] * stride_bq + offs_d[None, :], mask=b_mask, other=0.0)
    gram = tl.load(gram_ptr + j * stride_gb + offs_q[:, None] * BLOCK_Q + offs_q[None, :])
    acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)
    w_acc = tl.zeros([BLOCK_Q, BLOCK_Q], dtype=tl.float32)
    s_ptrs = sentences_ptr + offs_k[:, None] * stride_sk + offs_d[None, :]
    for i in range(0, num_pairs):
        sentence_valid = offs_k < tl.load(counts_ptr + i)
        s = tl.load(s_ptrs, mask=sentence_valid[:, None] & d_mask[None, :], other=0.0)
        s_ptrs += stride_sb
        s_float = s.to(tl.float32)
        s_norm = tl.sqrt(tl.sum(s_float * s_float, 1))
        lse = tl.load(lse_ptr + i * stride_lse + j)
        d_lse = tl.load(d_lse_ptr + i * stride_lse + j)
        scores, first, second, h, c_norm, inv_norms, cosine = _local_pair_forward(
            b, s, gram, s_norm, beat_valid, sentence_valid, t1, DOT_PRECISION)
        t, v, _ = _local_pair_backward(scores, first, second, h, c_norm, inv_norms, cosine, lse, d_lse,
                                       beat_valid, sentence_valid, t1, t2)
        acc += tl.dot(t, s_float, input_precision="tf32x3")  # (BLOCK_Q, BLOCK_D)
        # ieee: a TF32 product here made ptxas spill the whole loop body (sm_90, Triton 3.9)
        w_acc += tl.dot(v, tl.trans(second), input_precision="ieee")
    d_b = acc - tl.dot(w_acc, b.to(tl.float32), input_precision="tf32x3")
    tl.store(
        d_beats_ptr + j * stride_dbb + offs_q[:, None] * stride_dbq + offs_d[None, :],
        d_b.to(d_beats_ptr.dtype.element_ty), mask=b_mask,
    )


def _launch_config(num_beats: int, num_sentences: int, dim: int, device: torch.device) -> dict[str, int]:
    block_d = feature_block(dim, OP, MAX_BLOCK_D)
    block_q, block_s = max(16, next_power_of_2(num_beats)), max(16, next_power_of_2(num_sentences))
    if max(block_q, block_s) > MAX_BLOCK_QS:
        raise ValueError(
            f"{OP}: the Triton kernel holds a pair's beats × sentences on chip and supports Qb, S <= "
            f"{MAX_BLOCK_QS}, got Qb={num_beats}, S={num_sentences}; use impl='reference'"
        )
    num_warps = 4 if block_d * max(block_q, block_s) < 32 * 256 else 8  # fp32 accumulator ≤ 64 registers a thread
    return {"BLOCK_Q": block_q, "BLOCK_S": block_s, "BLOCK_D": block_d, "num_warps": num_warps}


def _ecgs_per_program(num_pairs: int, device: torch.device) -> int:
    """ECGs per forward program: enough programs to fill a GPU (~1024), few on the interpreter."""
    if device.type != "cuda":
        return 8
    return max(1, min(32, num_pairs * num_pairs // 1024))


def _check_kernels(beats: torch.Tensor) -> None:
    if not beats.is_cuda:
        require_interpreted(OP, _local_gram_kernel, _local_fwd_kernel, _local_bwd_sentence_kernel,
                            _local_bwd_beat_kernel)


def local_contrastive_forward(
    beats: torch.Tensor, sentences: torch.Tensor, sentence_counts: torch.Tensor, t1: float, t2: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """R[i, j] (B', B') fp32 and the beats' Gram matrices (B', BLOCK_Q, BLOCK_Q) fp32.

    beats (B', Qb, D), sentences (B', S, D) with unit stride on D, sentence_counts (B',) int32,
    every count in [1, S].
    """
    _check_kernels(beats)
    num_pairs, num_beats, dim = beats.shape
    config = _launch_config(num_beats, sentences.shape[1], dim, beats.device)
    precision = dot_precision(beats.dtype)
    gram = torch.empty(num_pairs, config["BLOCK_Q"], config["BLOCK_Q"], device=beats.device, dtype=torch.float32)
    _local_gram_kernel[(num_pairs,)](
        beats, gram, num_beats, dim,
        stride_bb=beats.stride(0), stride_bq=beats.stride(1), stride_gb=gram.stride(0),
        BLOCK_Q=config["BLOCK_Q"], BLOCK_D=config["BLOCK_D"], DOT_PRECISION=precision,
        num_warps=config["num_warps"],
    )
    lse = torch.empty(num_pairs, num_pairs, device=beats.device, dtype=torch.float32)
    per_program = _ecgs_per_program(num_pairs, beats.device)
    _local_fwd_kernel[(num_pairs, triton.cdiv(num_pairs, per_program))](
        beats, sentences, sentence_counts, gram, lse,
        num_pairs=num_pairs, num_beats=num_beats, dim=dim, ecgs_per_program=per_program, t1=t1, t2=t2,
        stride_bb=beats.stride(0), stride_bq=beats.stride(1), stride_sb=sentences.stride(0),
        stride_sk=sentences.stride(1), stride_gb=gram.stride(0), stride_lse=lse.stride(0),
        DOT_PRECISION=precision, **config,
    )
    return lse, gram


def local_contrastive_backward(
    beats: torch.Tensor,
    sentences: torch.Tensor,
    sentence_counts: torch.Tensor,
    gram: torch.Tensor,
    lse: torch.Tensor,
    d_lse: torch.Tensor,
    t1: float,
    t2: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """∂/∂beats and ∂/∂sentences (input dtypes) of Σ_ij d_lse[i, j]·R[i, j]; d_lse (B', B') fp32."""
    _check_kernels(beats)
    num_pairs, num_beats, dim = beats.shape
    num_sentences = sentences.shape[1]
    config = _launch_config(num_beats, num_sentences, dim, beats.device)
    d_beats = torch.empty_like(beats)
    d_sentences = torch.empty_like(sentences)
    common = dict(
        num_pairs=num_pairs, num_beats=num_beats, dim=dim, t1=t1, t2=t2,
        stride_bb=beats.stride(0), stride_bq=beats.stride(1), stride_sb=sentences.stride(0),
        stride_sk=sentences.stride(1), stride_gb=gram.stride(0), stride_lse=lse.stride(0),
        DOT_PRECISION=dot_precision(beats.dtype), **config,
    )
    _local_bwd_sentence_kernel[(num_pairs,)](
        beats, sentences, sentence_counts, gram, lse, d_lse, d_sentences,
        num_sentences=num_sentences, stride_dsb=d_sentences.stride(0), stride_dsk=d_sentences.stride(1), **common,
    )
    _local_bwd_beat_kernel[(num_pairs,)](
        beats, sentences, sentence_counts, gram, lse, d_lse, d_beats,
        stride_dbb=d_beats.stride(0), stride_dbq=d_beats.stride(1), **common,
    )
    return d_beats, d_sentences


class LocalSimilarityFunction(torch.autograd.Function):
    """R[i, j] = log Σ_k exp(τ2·cos(s_ik, c_ijk)) of text i against ECG j; (B', B') fp32."""

    @staticmethod
    def forward(
        ctx, beats: torch.Tensor, sentences: torch.Tensor, sentence_counts: torch.Tensor, t1: float, t2: float
    ) -> torch.Tensor:
        beats, sentences = contiguous(beats), contiguous(sentences)
        sentence_counts = sentence_counts.to(torch.int32)
        lse, gram = local_contrastive_forward(beats, sentences, sentence_counts, t1, t2)
        ctx.save_for_backward(beats, sentences, sentence_counts, gram, lse)
        ctx.temperatures = (t1, t2)
        return lse

    @staticmethod
    def backward(ctx, d_lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None, None]:
        beats, sentences, sentence_counts, gram, lse = ctx.saved_tensors
        d_lse = d_lse.float().contiguous()
        d_beats, d_sentences = local_contrastive_backward(
            beats, sentences, sentence_counts, gram, lse, d_lse, *ctx.temperatures)
        return d_beats, d_sentences, None, None, None


def local_contrastive_loss(
    beats: torch.Tensor,
    sentences: torch.Tensor,
    sentence_counts: torch.Tensor,
    t1: float = 4.0,
    t2: float = 5.0,
    t3: float = 10.0,
    impl: Impl = "auto",
) -> torch.Tensor:
    """METHOD.md §3 local loss ½[CE(M, I) + CE(Mᵀ, I)], M[j, i] = t3·R(i, j); 0-d float32.

    beats (B, Qb, D); sentences (B, S, D), zero-padded past each text's count; sentence_counts
    (B,) int in [0, S]. Texts with no sentence and their ECGs are left out of both sides of M;
    with none left the loss is a zero connected to the inputs (zero gradients), with one left
    it is 0. ``impl``: "auto" | "reference" | "triton" (see ``kernels._utils.resolve_impl``).
    """
    validate_local_contrastive(beats, sentences, sentence_counts)
    if resolve_impl(impl, OP, [beats, sentences], has_triton=True) == "reference":
        return reference.local_contrastive_loss(beats, sentences, sentence_counts, t1, t2, t3)
    keep = sentence_counts > 0
    num_kept, max_count = torch.stack([keep.sum(), sentence_counts.max()]).tolist() if keep.numel() else (0, 0)
    if num_kept == 0:  # the reference's zero, connected to beats and sentences
        return reference.local_contrastive_loss(beats, sentences, sentence_counts, t1, t2, t3)
    if num_kept < keep.numel():
        beats, sentences, sentence_counts = beats[keep], sentences[keep], sentence_counts[keep]
    sentences = sentences[:, :max_count]  # sentence slots past every count: no work
    similarity = LocalSimilarityFunction.apply(beats, sentences, sentence_counts, float(t1), float(t2))
    logits = t3 * similarity.transpose(0, 1)  # M[j, i]: (B', B')
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.transpose(0, 1), labels))
