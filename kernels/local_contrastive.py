"""Fused local beat-sentence contrastive loss of the MELP paper: Triton forward and backward.

Math: text i with sentences s_k (k < S_i), ECG j with beats b_q (q < Qb):

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
D ≤ 512. The kernels score all B × B pairs (a text with no sentence is scored as one zero
sentence: finite, R = 0) and the loss masks the pairs of empty texts out of both sides of M
(``reference.local_loss_from_similarity``): no host sync, no data-dependent shape, so a step
with this op captures in torch.compile(fullgraph=True) and CUDA graphs. B' = 0 kept pairs gives
a zero with zero gradients, B' = 1 gives 0 — the rules of ``kernels.reference``.

Kernels (R, B × B fp32 and saved for the backward, is the only B²-sized tensor of the forward):
    _local_gram_kernel   per ECG j: G_j = b_j·b_jᵀ (B, BLOCK_Q, BLOCK_Q) fp32.
    _local_fwd_kernel    per (text i, block of ECGs): s_i and ‖s_i‖ resident, beats streamed;
                         writes R(i, j).
    _local_bwd_kernel    per (text i, block of ECGs), one kernel for both gradients: recomputes
                         each pair's forward once and writes the pair's small factors T_ij
                         (Qb × S), W_ij = v_ij·α_ijᵀ (Qb × Qb) and dcos·cos (S) in fp32. The
                         D-wide sums over partners are then two dense fp32 GEMMs (cuBLAS):
                         ∂L/∂s = T·b (contracting j, q),  ∂L/∂b = Tᵀ·s (contracting i, k) − W·b.
                         Texts are processed in chunks so the factors stay ≤ FACTOR_BYTES.
The symmetric cross entropy on M = τ3·Rᵀ is plain torch (B² floats); its gradient dR feeds the
backward kernel, which uses the saved R (log-sum-exp over sentences) to form w.

Work per pair: forward Qb·S·D (A) + Qb²·D/B (Gram, amortised) multiply-adds, backward Qb·S·D
(A recomputed) + 2·Qb·S·D (the two GEMMs): 4·Qb·S·D multiply-adds per pair per training step.

Numerics: every product is accumulated in fp32; A (and G) take the input dtype's operands
(fp32 inputs: 3×TF32 dots for A, exact fp32 for G); everything after A is fp32, the GEMMs too
(fp32 operands: dR ~ 1/B'² would underflow in fp16). Gradients are returned in the input dtype.
The ops are registered with torch.library (``melp_kernels::local_similarity`` and its
backward); their backward is not differentiable (double backward raises).
"""

from __future__ import annotations

import torch
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
    uses_cuda_launch_configs,
    validate_local_contrastive,
    validate_positive_ids,
)

OP = "local_contrastive_loss"
MAX_BLOCK_D = 512
MAX_BLOCK_QS = 64  # beats per ECG and sentences per text, padded: tiles are (BLOCK_Q, BLOCK_S)
COSINE_EPS = reference.COSINE_EPS  # the kernels spell it as a literal 1e-8 (a jit function reads no Python globals)
assert COSINE_EPS == 1e-8


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
def _text_sentences(sentences_ptr, counts_ptr, i, num_sentences, stride_sb, stride_sk, offs_k, offs_d, d_mask):
    # text i's sentences (zero past its count), their norms, and the slots its softmaxes use
    # (an empty text is scored as one zero sentence); counts are clamped to [0, S]
    count = tl.minimum(tl.maximum(tl.load(counts_ptr + i), 0), num_sentences)
    present = offs_k < count
    s = tl.load(
        sentences_ptr + i * stride_sb + offs_k[:, None] * stride_sk + offs_d[None, :],
        mask=present[:, None] & d_mask[None, :], other=0.0,
    )  # (BLOCK_S, BLOCK_D)
    s_float = s.to(tl.float32)
    s_norm = tl.sqrt(tl.sum(s_float * s_float, 1))
    return s, s_norm, offs_k < tl.maximum(count, 1)


@triton.jit
def _local_fwd_kernel(
    beats_ptr, sentences_ptr, counts_ptr, gram_ptr, lse_ptr,
    num_pairs, num_beats, num_sentences, dim, ecgs_per_program, t1, t2,
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
    s, s_norm, sentence_valid = _text_sentences(
        sentences_ptr, counts_ptr, i, num_sentences, stride_sb, stride_sk, offs_k, offs_d, d_mask)
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
def _local_bwd_kernel(
    beats_ptr, sentences_ptr, counts_ptr, gram_ptr, lse_ptr, d_lse_ptr, t_ptr, w_ptr, zc_ptr,
    text_start, num_pairs, num_beats, num_sentences, dim, ecgs_per_program, t1, t2,
    stride_bb, stride_bq, stride_sb, stride_sk, stride_gb, stride_lse,
    BLOCK_Q: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # per pair (i, j): T_ij = u + dA (Qb × S), W_ij = v·αᵀ (Qb × Qb), zc_ij = dcos ∘ cos (S), fp32,
    # stored at [row, j] with row = i − text_start (the chunk's texts)
    row = tl.program_id(0).to(tl.int64)
    i = text_start + row
    j_start = tl.program_id(1) * ecgs_per_program
    j_end = tl.minimum(j_start + ecgs_per_program, num_pairs)
    offs_q = tl.arange(0, BLOCK_Q)
    offs_p = tl.arange(0, BLOCK_Q)
    offs_k = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < dim
    beat_valid = offs_q < num_beats
    s, s_norm, sentence_valid = _text_sentences(
        sentences_ptr, counts_ptr, i, num_sentences, stride_sb, stride_sk, offs_k, offs_d, d_mask)
    b_mask = beat_valid[:, None] & d_mask[None, :]
    t_mask = beat_valid[:, None] & (offs_k[None, :] < num_sentences)
    w_mask = beat_valid[:, None] & (offs_p[None, :] < num_beats)
    b_ptrs = beats_ptr + j_start.to(tl.int64) * stride_bb + offs_q[:, None] * stride_bq + offs_d[None, :]
    gram_ptrs = gram_ptr + j_start.to(tl.int64) * stride_gb + offs_q[:, None] * BLOCK_Q + offs_q[None, :]
    pair = row * num_pairs + j_start  # int64: index of (row, j) in the factor buffers
    t_ptrs = t_ptr + pair * (num_beats * num_sentences) + offs_q[:, None] * num_sentences + offs_k[None, :]
    w_ptrs = w_ptr + pair * (num_beats * num_beats) + offs_q[:, None] * num_beats + offs_p[None, :]
    zc_ptrs = zc_ptr + pair * num_sentences + offs_k
    for j in range(j_start, j_end):
        b = tl.load(b_ptrs, mask=b_mask, other=0.0)
        gram = tl.load(gram_ptrs)
        lse = tl.load(lse_ptr + i * stride_lse + j)
        d_lse = tl.load(d_lse_ptr + i * stride_lse + j)
        scores, first, second, h, c_norm, inv_norms, cosine = _local_pair_forward(
            b, s, gram, s_norm, beat_valid, sentence_valid, t1, DOT_PRECISION)
        t, v, d_cos = _local_pair_backward(scores, first, second, h, c_norm, inv_norms, cosine, lse, d_lse,
                                           beat_valid, sentence_valid, t1, t2)
        w = tl.dot(v, tl.trans(second), input_precision="ieee")  # (BLOCK_Q, BLOCK_Q), small: exact fp32
        tl.store(t_ptrs, t, mask=t_mask)
        tl.store(w_ptrs, w, mask=w_mask)
        tl.store(zc_ptrs, d_cos * cosine, mask=offs_k < num_sentences)
        b_ptrs += stride_bb
        gram_ptrs += stride_gb
        t_ptrs += num_beats * num_sentences
        w_ptrs += num_beats * num_beats
        zc_ptrs += num_sentences


FACTOR_BYTES = 256 * 2**20  # the backward's per-pair factors (T, W, zc) for one chunk of texts


def _launch_config(num_beats: int, num_sentences: int, dim: int, dtype: torch.dtype,
                   device: torch.device) -> dict[str, int]:
    block_d = feature_block(dim, OP, MAX_BLOCK_D)
    block_q, block_s = max(16, next_power_of_2(num_beats)), max(16, next_power_of_2(num_sentences))
    if max(block_q, block_s) > MAX_BLOCK_QS:
        raise ValueError(
            f"{OP}: the Triton kernel holds a pair's beats × sentences on chip and supports Qb, S <= "
            f"{MAX_BLOCK_QS}, got Qb={num_beats}, S={num_sentences}; use impl='reference'"
        )
    # warps sized to the resident (BLOCK_S, BLOCK_D) sentence and (BLOCK_Q, BLOCK_D) beat tiles;
    # fp32 tiles (3×TF32 splits each operand) take twice the registers of fp16/bf16 ones
    tile = block_d * max(block_q, block_s) * (2 if dtype == torch.float32 else 1)
    num_warps = 4 if tile <= 32 * 256 else 8
    return {"BLOCK_Q": block_q, "BLOCK_S": block_s, "BLOCK_D": block_d, "num_warps": num_warps}


def _ecgs_per_program(num_texts: int, num_pairs: int, device: torch.device) -> int:
    """ECGs per program: enough programs (num_texts × blocks ≈ 2048) to fill a GPU; few on the
    interpreter, where a program is the unit of Python overhead."""
    if not uses_cuda_launch_configs(device):
        return 8
    return max(1, min(32, num_texts * num_pairs // 2048))


def _check_kernels(beats: torch.Tensor) -> None:
    if not beats.is_cuda:
        require_interpreted(OP, _local_gram_kernel, _local_fwd_kernel, _local_bwd_kernel)


def local_contrastive_forward(
    beats: torch.Tensor, sentences: torch.Tensor, sentence_counts: torch.Tensor, t1: float, t2: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """R[i, j] (B, B) fp32 and the beats' Gram matrices (B, BLOCK_Q, BLOCK_Q) fp32.

    beats (B, Qb, D), sentences (B, S, D) with unit stride on D, sentence_counts (B,) int32
    contiguous (counts are clamped to [0, S]; an empty text scores R = 0).
    """
    _check_kernels(beats)
    num_pairs, num_beats, dim = beats.shape
    config = _launch_config(num_beats, sentences.shape[1], dim, beats.dtype, beats.device)
    precision = dot_precision(beats.dtype)
    gram = torch.empty(num_pairs, config["BLOCK_Q"], config["BLOCK_Q"], device=beats.device, dtype=torch.float32)
    _local_gram_kernel[(num_pairs,)](
        beats, gram, num_beats, dim,
        stride_bb=beats.stride(0), stride_bq=beats.stride(1), stride_gb=gram.stride(0),
        BLOCK_Q=config["BLOCK_Q"], BLOCK_D=config["BLOCK_D"],
        DOT_PRECISION="ieee" if beats.dtype == torch.float32 else precision,  # 3×TF32 spilled here (sm_90)
        num_warps=config["num_warps"],
    )
    lse = torch.empty(num_pairs, num_pairs, device=beats.device, dtype=torch.float32)
    per_program = _ecgs_per_program(num_pairs, num_pairs, beats.device)
    _local_fwd_kernel[(num_pairs, triton.cdiv(num_pairs, per_program))](
        beats, sentences, sentence_counts, gram, lse,
        num_pairs=num_pairs, num_beats=num_beats, num_sentences=sentences.shape[1], dim=dim,
        ecgs_per_program=per_program, t1=t1, t2=t2,
        stride_bb=beats.stride(0), stride_bq=beats.stride(1), stride_sb=sentences.stride(0),
        stride_sk=sentences.stride(1), stride_gb=gram.stride(0), stride_lse=lse.stride(0),
        DOT_PRECISION=precision, **config,
    )
    return lse, gram


def _text_chunk(num_pairs: int, num_beats: int, num_sentences: int) -> int:
    """Texts per backward launch: their factors (T, W, zc: fp32 per pair) fit FACTOR_BYTES."""
    per_text = num_pairs * (num_beats * num_sentences + num_beats * num_beats + num_sentences) * 4
    return max(1, min(num_pairs, FACTOR_BYTES // per_text))


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
    """∂/∂beats and ∂/∂sentences (input dtypes) of Σ_ij d_lse[i, j]·R[i, j]; d_lse (B, B) fp32."""
    _check_kernels(beats)
    num_pairs, num_beats, dim = beats.shape
    num_sentences = sentences.shape[1]
    config = _launch_config(num_beats, num_sentences, dim, beats.dtype, beats.device)
    chunk = _text_chunk(num_pairs, num_beats, num_sentences)
    beats32, sentences32 = beats.float(), sentences.float()
    d_beats = torch.zeros(num_pairs, num_beats, dim, device=beats.device, dtype=torch.float32)
    d_sentences = torch.empty(num_pairs, num_sentences, dim, device=beats.device, dtype=torch.float32)
    w_sum = torch.zeros(num_pairs, num_beats, num_beats, device=beats.device, dtype=torch.float32)
    z = torch.empty(num_pairs, num_sentences, device=beats.device, dtype=torch.float32)
    for start in range(0, num_pairs, chunk):  # static shapes: the loop unrolls under torch.compile
        rows = min(chunk, num_pairs - start)
        t = torch.empty(rows, num_pairs, num_beats, num_sentences, device=beats.device, dtype=torch.float32)
        w = torch.empty(rows, num_pairs, num_beats, num_beats, device=beats.device, dtype=torch.float32)
        zc = torch.empty(rows, num_pairs, num_sentences, device=beats.device, dtype=torch.float32)
        per_program = _ecgs_per_program(rows, num_pairs, beats.device)
        _local_bwd_kernel[(rows, triton.cdiv(num_pairs, per_program))](
            beats, sentences, sentence_counts, gram, lse, d_lse, t, w, zc,
            text_start=start, num_pairs=num_pairs, num_beats=num_beats, num_sentences=num_sentences, dim=dim,
            ecgs_per_program=per_program, t1=t1, t2=t2,
            stride_bb=beats.stride(0), stride_bq=beats.stride(1), stride_sb=sentences.stride(0),
            stride_sk=sentences.stride(1), stride_gb=gram.stride(0), stride_lse=lse.stride(0),
            DOT_PRECISION=dot_precision(beats.dtype), **config,
        )
        # t[i, j, q, k]:  ∂L/∂s_i = Σ_{j,q} T[i,j,q,k]·b[j,q] ;  ∂L/∂b_j += Σ_{i,k} T[i,j,q,k]·s[i,k]
        d_sentences[start:start + rows] = (
            t.permute(0, 3, 1, 2).reshape(rows * num_sentences, num_pairs * num_beats)
            @ beats32.reshape(num_pairs * num_beats, dim)
        ).view(rows, num_sentences, dim)
        d_beats += (
            t.permute(1, 2, 0, 3).reshape(num_pairs * num_beats, rows * num_sentences)
            @ sentences32[start:start + rows].reshape(rows * num_sentences, dim)
        ).view(num_pairs, num_beats, dim)
        w_sum += w.sum(0)
        z[start:start + rows] = zc.sum(1)
    d_beats -= torch.bmm(w_sum, beats32)  # − (Σ_i v_ij·α_ijᵀ)·b_j
    s_norm = sentences32.norm(dim=-1)
    z = torch.where(s_norm > COSINE_EPS, z / s_norm.clamp_min(COSINE_EPS).square(), 0.0)
    present = torch.arange(num_sentences, device=beats.device)[None, :] < sentence_counts[:, None]
    d_sentences = (d_sentences - z[:, :, None] * sentences32) * present[:, :, None]
    return d_beats.to(beats.dtype), d_sentences.to(sentences.dtype)


# --- torch.library registration: opaque to torch.compile (fake shapes), capturable by CUDA graphs ----


def _define_ops() -> tuple:
    @torch.library.custom_op("melp_kernels::local_similarity", mutates_args=())
    def local_similarity_op(
        beats: torch.Tensor, sentences: torch.Tensor, sentence_counts: torch.Tensor, t1: float, t2: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return local_contrastive_forward(beats, sentences, sentence_counts, t1, t2)

    @local_similarity_op.register_fake
    def _(beats, sentences, sentence_counts, t1, t2):
        num_pairs, num_beats, dim = beats.shape
        block_q = _launch_config(num_beats, sentences.shape[1], dim, beats.dtype, beats.device)["BLOCK_Q"]
        return (beats.new_empty(num_pairs, num_pairs, dtype=torch.float32),
                beats.new_empty(num_pairs, block_q, block_q, dtype=torch.float32))

    @torch.library.custom_op("melp_kernels::local_similarity_backward", mutates_args=())
    def local_similarity_backward_op(
        beats: torch.Tensor, sentences: torch.Tensor, sentence_counts: torch.Tensor, gram: torch.Tensor,
        lse: torch.Tensor, d_lse: torch.Tensor, t1: float, t2: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return local_contrastive_backward(beats, sentences, sentence_counts, gram, lse, d_lse, t1, t2)

    @local_similarity_backward_op.register_fake
    def _(beats, sentences, sentence_counts, gram, lse, d_lse, t1, t2):
        return torch.empty_like(beats), torch.empty_like(sentences)

    def setup_context(ctx, inputs, output) -> None:
        beats, sentences, sentence_counts, t1, t2 = inputs
        lse, gram = output
        ctx.save_for_backward(beats, sentences, sentence_counts, gram, lse)
        ctx.temperatures = (t1, t2)
        ctx.mark_non_differentiable(gram)

    def backward(ctx, d_lse, _d_gram):
        # the backward op has no autograd formula: differentiating it (double backward) raises
        beats, sentences, sentence_counts, gram, lse = ctx.saved_tensors
        d_beats, d_sentences = local_similarity_backward_op(
            beats, sentences, sentence_counts, gram, lse, d_lse.float().contiguous(), *ctx.temperatures)
        return d_beats, d_sentences, None, None, None

    local_similarity_op.register_autograd(backward, setup_context=setup_context)
    return local_similarity_op, local_similarity_backward_op


if "_OPS" not in globals():  # importlib.reload (tests/kernel_utils.use_triton_interpreter) must not redefine
    _OPS = _define_ops()


def local_similarity(
    beats: torch.Tensor, sentences: torch.Tensor, sentence_counts: torch.Tensor, t1: float, t2: float
) -> torch.Tensor:
    """R[i, j] = log Σ_k exp(τ2·cos(s_ik, c_ijk)) of text i against ECG j, all B × B pairs; fp32."""
    beats, sentences = contiguous(beats), contiguous(sentences)
    sentence_counts = sentence_counts.to(torch.int32).contiguous()  # the kernels read counts[i] at stride 1
    similarity, _ = _OPS[0](beats, sentences, sentence_counts, float(t1), float(t2))
    return similarity


def local_contrastive_loss(
    beats: torch.Tensor,
    sentences: torch.Tensor,
    sentence_counts: torch.Tensor,
    t1: float = 4.0,
    t2: float = 5.0,
    t3: float = 10.0,
    impl: Impl = "auto",
    positive_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The MELP paper's local loss ½[CE(M, I) + CE(Mᵀ, I)], M[j, i] = t3·R(i, j); 0-d float32.

    ``positive_ids`` (B,) int (e.g. report hashes): multi-positive soft targets on M, uniform
    over the kept pairs with the same id, both directions (``reference.local_loss_from_similarity``;
    the kernels' backward takes its dR, so both paths share it). None: the paper's loss.

    beats (B, Qb, D); sentences (B, S, D), zero-padded past each text's count; sentence_counts
    (B,) int in [0, S]. Texts with no sentence and their ECGs are left out of both sides of M;
    with none left the loss is a zero connected to the inputs (zero gradients), with one left
    it is 0. No host sync. ``impl``: "auto" | "reference" | "triton" (``kernels._utils.resolve_impl``).
    """
    validate_local_contrastive(beats, sentences, sentence_counts)
    validate_positive_ids(OP, positive_ids, beats.shape[0], beats.device)
    if resolve_impl(impl, OP, [beats, sentences], has_triton=True) == "reference" or beats.shape[0] == 0:
        return reference.local_contrastive_loss(  # B = 0: no grid
            beats, sentences, sentence_counts, t1, t2, t3, positive_ids)
    similarity = local_similarity(beats, sentences, sentence_counts, t1, t2)  # R[i, j]: (B, B)
    return reference.local_loss_from_similarity(similarity, sentence_counts > 0, t3, positive_ids)
