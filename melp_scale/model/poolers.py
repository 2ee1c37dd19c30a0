"""Attention poolers: learned queries cross-attending to ECG tokens (METHOD.md §2).

The nn.Module owns the parameters (queries, LayerNorms, q/k/v/out projections); the
multi-head attention core is ``kernels.attention_pool`` (ARCHITECTURE.md kernel contract),
so the same module runs the Triton kernel on CUDA and the PyTorch reference on the CPU.
"""
from __future__ import annotations

import torch
from torch import nn

from kernels import attention_pool


class AttentionPooler(nn.Module):
    """``num_queries`` learned queries of width ``dim`` over tokens of width ``context_dim``.

    tokens (B, N, context_dim) -> (B, num_queries, dim). LayerNorm on the queries and on the
    keys' input, as in open_clip's AttentionalPooler.
    """

    def __init__(self, dim: int, context_dim: int, num_queries: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"pooler heads: width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.queries = nn.Parameter(torch.randn(num_queries, dim) * dim ** -0.5)
        self.norm_queries = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(context_dim)
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(context_dim, dim)
        self.v_proj = nn.Linear(context_dim, dim)
        self.out_proj = nn.Linear(dim, dim)

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
    """Beat embeddings: pooler -> LayerNorm (the linear-probe feature) -> ``proj_contrast``."""

    def __init__(self, embed_dim: int, context_dim: int, num_queries: int, num_heads: int):
        super().__init__()
        self.pool = AttentionPooler(embed_dim, context_dim, num_queries, num_heads)
        self.norm = nn.LayerNorm(embed_dim)
        # a plain matrix (no bias), as in CoCa/CONCH's proj_contrast
        self.proj_contrast = nn.Linear(embed_dim, embed_dim, bias=False)
        nn.init.normal_(self.proj_contrast.weight, std=embed_dim ** -0.5)

    def pooled(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, Q_b, E), normalised, before ``proj_contrast``."""
        return self.norm(self.pool(tokens))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> beat embeddings (B, Q_b, E), unnormalised."""
        return self.proj_contrast(self.pooled(tokens))
