"""Caption decoder (README, "Model"), the reference's open_clip ``MultimodalTransformer``.

Layer i (pre-LN everywhere, GELU exact, no layer-scale):

1. ``resblocks[i]``: x = x + SelfAttn(ln_1 x) (causal); x = x + MLP(ln_2 x)
2. ``cross_attn[i]``: x = x + Attn(q = ln_1 x, k = v = ln_1_kv ecg); x = x + MLP(ln_2 x)

then ``ln_final`` and ``text_projection`` to the vocabulary. Input: the text encoder's token
states (B, L, W), W = the text hidden size; context: the caption pooler's ECG tokens (B, M, W).
Attention is ``nn.MultiheadAttention``'s layout (fused ``in_proj_weight`` (3W, W) rows
[W_q; W_k; W_v], ``in_proj_bias``, ``out_proj``), so official weights load unchanged.

Initialisation is the reference's (PyTorch defaults: Xavier-uniform over the fused in_proj,
zero in/out biases, ``nn.Linear`` defaults elsewhere), except ``text_projection``: the reference
creates it with ``torch.empty`` and never initialises it (its ``init_parameters`` is never
called), so a fresh reference model holds whatever memory was there. We keep our fix and draw it
from N(0, W**-0.5), the init that ``init_parameters`` would apply. It is an ``nn.Linear`` without
bias whose weight is the transpose of the reference's (W, V) matrix (the converter transposes).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import DecoderConfig


class MultiheadAttention(nn.Module):
    """nn.MultiheadAttention's parameters, computed with SDPA (batch first)."""

    def __init__(self, width: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None, causal: bool) -> torch.Tensor:
        batch, length, width = x.shape
        weight, bias = self.in_proj_weight, self.in_proj_bias
        if context is None:  # self-attention: one fused projection
            q, k, v = F.linear(x, weight, bias).chunk(3, dim=-1)
        else:
            q = F.linear(x, weight[:width], bias[:width])
            k, v = F.linear(context, weight[width:], bias[width:]).chunk(2, dim=-1)
        q, k, v = (t.reshape(batch, t.shape[1], self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=causal, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width))


class ResidualAttentionBlock(nn.Module):
    """x += Attn(ln_1 x[, ln_1_kv context]); x += MLP(ln_2 x)."""

    def __init__(self, width: int, config: DecoderConfig, cross: bool):
        super().__init__()
        self.cross = cross
        self.ln_1 = nn.LayerNorm(width)
        self.attn = MultiheadAttention(width, config.num_heads, config.dropout)
        if cross:
            self.ln_1_kv = nn.LayerNorm(width)
        self.ln_2 = nn.LayerNorm(width)
        hidden = int(width * config.mlp_ratio)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, hidden))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(hidden, width))
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if self.cross:
            x = x + self.dropout(self.attn(self.ln_1(x), self.ln_1_kv(context), causal=False))
        else:
            x = x + self.dropout(self.attn(self.ln_1(x), None, causal=True))
        return x + self.dropout(self.mlp(self.ln_2(x)))


class CaptionDecoder(nn.Module):
    """Token states (B, L, W) + ECG tokens (B, M, W) -> hidden (B, L, W); ``logits`` -> vocab."""

    def __init__(self, width: int, vocab_size: int, config: DecoderConfig):
        super().__init__()
        self.checkpoint_layers = config.checkpoint_layers
        if width % config.num_heads:
            raise ValueError(f"decoder.num_heads: {config.num_heads} does not divide the text "
                             f"hidden size {width} (the decoder width)")
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, config, cross=False)
                                        for _ in range(config.num_layers)])
        self.cross_attn = nn.ModuleList([ResidualAttentionBlock(width, config, cross=True)
                                         for _ in range(config.num_layers)])
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Linear(width, vocab_size, bias=False)
        nn.init.normal_(self.text_projection.weight, std=width ** -0.5)

    def forward(self, states: torch.Tensor, ecg_tokens: torch.Tensor) -> torch.Tensor:
        x = states
        checkpointed = self.checkpoint_layers and torch.is_grad_enabled()
        for self_block, cross_block in zip(self.resblocks, self.cross_attn):
            if checkpointed:  # recompute each block in the backward (RNG state replayed)
                x = checkpoint(self_block, x, use_reentrant=False)
                x = checkpoint(cross_block, x, ecg_tokens, use_reentrant=False)
            else:
                x = cross_block(self_block(x), ecg_tokens)
        return self.ln_final(x)  # (B, L, W)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., W) -> (..., vocab)."""
        return self.text_projection(hidden)
