"""Caption decoder (METHOD.md §2): N pre-LN layers of causal self-attention, cross-attention
onto the caption ECG tokens and an MLP; final LayerNorm; projection to the vocabulary.

Input: the text encoder's token states (B, L, W), W = the text hidden size; context: the
caption pooler's ECG tokens (B, M, C). Initialisation follows GPT-2: N(0, 0.02) for every
linear layer, residual output projections scaled by 1/√(2·layers), zero biases; the
vocabulary projection is initialised too (the reference leaves it uninitialised).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import DecoderConfig


class _Attention(nn.Module):
    """Multi-head attention of queries (B, L, W) over a context (B, M, C) via SDPA."""

    def __init__(self, width: int, context_dim: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(width, width)
        self.kv_proj = nn.Linear(context_dim, 2 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, context: torch.Tensor, causal: bool) -> torch.Tensor:
        batch, length, width = x.shape
        heads = self.num_heads
        q = self.q_proj(x).view(batch, length, heads, -1).transpose(1, 2)  # (B, h, L, d)
        k, v = self.kv_proj(context).view(batch, context.shape[1], 2, heads, -1).unbind(dim=2)
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, h, M, d)
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=causal, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width))


class DecoderLayer(nn.Module):
    """x += SelfAttn(LN x) (causal); x += CrossAttn(LN x, LN ecg); x += MLP(LN x)."""

    def __init__(self, width: int, context_dim: int, config: DecoderConfig):
        super().__init__()
        self.norm_self = nn.LayerNorm(width)
        self.self_attn = _Attention(width, width, config.num_heads, config.dropout)
        self.norm_cross = nn.LayerNorm(width)
        self.norm_context = nn.LayerNorm(context_dim)
        self.cross_attn = _Attention(width, context_dim, config.num_heads, config.dropout)
        self.norm_mlp = nn.LayerNorm(width)
        hidden = int(round(width * config.mlp_ratio))
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width),
                                 nn.Dropout(config.dropout))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h = self.norm_self(x)
        x = x + self.self_attn(h, h, causal=True)
        x = x + self.cross_attn(self.norm_cross(x), self.norm_context(context), causal=False)
        return x + self.mlp(self.norm_mlp(x))


class CaptionDecoder(nn.Module):
    """Token states (B, L, W) + ECG tokens (B, M, C) -> hidden (B, L, W); ``logits`` -> vocab."""

    def __init__(self, width: int, context_dim: int, vocab_size: int, config: DecoderConfig):
        super().__init__()
        if width % config.num_heads:
            raise ValueError(f"decoder.num_heads: {config.num_heads} does not divide the text "
                             f"hidden size {width} (the decoder width)")
        self.layers = nn.ModuleList([DecoderLayer(width, context_dim, config)
                                     for _ in range(config.num_layers)])
        self.norm = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab_size, bias=False)
        self._init_weights(config.num_layers)

    def _init_weights(self, num_layers: int) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        residual_std = 0.02 / math.sqrt(2 * num_layers)
        for layer in self.layers:
            for projection in (layer.self_attn.out_proj, layer.cross_attn.out_proj, layer.mlp[2]):
                nn.init.normal_(projection.weight, std=residual_std)

    def forward(self, states: torch.Tensor, ecg_tokens: torch.Tensor) -> torch.Tensor:
        x = states
        for layer in self.layers:
            x = layer(x, ecg_tokens)
        return self.norm(x)  # (B, L, W)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., W) -> (..., vocab)."""
        return self.lm_head(hidden)
