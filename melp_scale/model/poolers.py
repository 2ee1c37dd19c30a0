"""Attention poolers: learned queries cross-attending to ECG tokens (beat and caption poolers).

The nn.Module owns the parameters (queries, LayerNorms, q/k/v/out projections); the
multi-head attention core is ``kernels.attention_pool`` (per-head softmax(q·kᵀ/√d)·v, no projections),
so the same module runs the Triton kernel on CUDA and the PyTorch reference on the CPU.

Same computation as the reference's open_clip ``AttentionalPooler`` (``nn.MultiheadAttention``
with ``ln_k`` on the tokens and ``ln_q`` on the queries, no residual, no MLP) and the same
initialisation: queries N(0, 1); q/k/v weights Xavier-uniform (over the fused (3D, D) matrix when
the key width equals the query width, as ``nn.MultiheadAttention`` does, else per matrix); q/k/v
and output biases zero; output weight the ``nn.Linear`` default.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from kernels import attention_pool


class AttentionPooler(nn.Module):
    """``num_queries`` learned queries of width ``dim`` over tokens of width ``context_dim``.

    tokens (B, N, context_dim) -> (B, num_queries, dim).
    """

    def __init__(self, dim: int, context_dim: int, num_queries: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"pooler heads: width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.queries = nn.Parameter(torch.randn(num_queries, dim))
        self.norm_queries = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(context_dim)
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(context_dim, dim)
        self.v_proj = nn.Linear(context_dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        projections = (self.q_proj, self.k_proj, self.v_proj)
        if context_dim == dim:  # nn.MultiheadAttention's fused in_proj_weight (3D, D)
            bound = math.sqrt(6.0 / (dim + 3 * dim))
            for projection in projections:
                nn.init.uniform_(projection.weight, -bound, bound)
        else:
            for projection in projections:
                nn.init.xavier_uniform_(projection.weight)
        for projection in (*projections, self.out_proj):
            nn.init.zeros_(projection.bias)

    def forward(self, tokens: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        context = self.norm_context(tokens)  # (B, N, C)
        queries = self.q_proj(self.norm_queries(self.queries))  # (Q, D), shared by the batch
        keys = self.k_proj(context)  # (B, N, D)
        values = self.v_proj(context)  # (B, N, D)
        pooled = attention_pool(queries, keys, values, self.num_heads,
                                key_padding_mask=key_padding_mask)  # (B, Q, D)
        return self.out_proj(pooled)


class BeatPooler(nn.Module):
    """Beat embeddings: pooler -> LayerNorm (``ln_contrast``; the linear-probe feature) ->
    ``proj_contrast``, a bias-free matrix. The reference stores it as P and computes x @ P;
    here it is an ``nn.Linear`` whose weight is Pᵀ (the converter transposes)."""

    def __init__(self, embed_dim: int, context_dim: int, num_queries: int, num_heads: int):
        super().__init__()
        self.pool = AttentionPooler(embed_dim, context_dim, num_queries, num_heads)
        self.norm = nn.LayerNorm(embed_dim)
        self.proj_contrast = nn.Linear(embed_dim, embed_dim, bias=False)
        # the reference: context_width**-0.5 * randn(E, E)
        nn.init.normal_(self.proj_contrast.weight, std=context_dim ** -0.5)

    def pooled(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, Q_b, E), normalised, before ``proj_contrast``."""
        return self.norm(self.pool(tokens))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> beat embeddings (B, Q_b, E), unnormalised."""
        return self.proj_contrast(self.pooled(tokens))


class CaptionPooler(nn.Module):
    """The decoder's ECG memory: pooler (``attn_pool_caption``) -> LayerNorm (``ln_caption``)."""

    def __init__(self, dim: int, context_dim: int, num_queries: int, num_heads: int):
        super().__init__()
        self.pool = AttentionPooler(dim, context_dim, num_queries, num_heads)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, M, dim)."""
        return self.norm(self.pool(tokens))
