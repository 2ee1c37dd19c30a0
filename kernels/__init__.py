"""Fused Triton ops of melp-scale with their PyTorch references (``kernels.reference``).

Public ops (see ``shared/design/ARCHITECTURE.md``, "The kernel contract"):

    attention_pool(queries, keys, values, num_heads, key_padding_mask=None, impl="auto")
    local_contrastive_loss(beats, sentences, sentence_counts, t1=4.0, t2=5.0, t3=10.0, impl="auto")
    infonce_loss(x, t, logit_scale, group=None, impl="auto")

``impl``: "auto" (Triton for CUDA tensors, else the reference), "reference", or "triton"
(CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``). This package knows nothing
of ``melp_scale``; the nn.Modules wrapping these ops live there.
"""

from __future__ import annotations

import torch

from kernels import reference
from kernels._utils import Impl, resolve_impl
from kernels.infonce import infonce_loss

__all__ = ["attention_pool", "infonce_loss", "local_contrastive_loss", "reference"]


def attention_pool(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    num_heads: int,
    key_padding_mask: torch.Tensor | None = None,
    impl: Impl = "auto",
) -> torch.Tensor:
    """Multi-head attention pooling (B, Q, D); see ``kernels.reference.attention_pool``.

    No Triton kernel yet: "auto" runs the reference, "triton" raises ``ValueError``.
    """
    resolve_impl(impl, "attention_pool", [queries, keys, values], has_triton=False)
    return reference.attention_pool(queries, keys, values, num_heads, key_padding_mask)


def local_contrastive_loss(
    beats: torch.Tensor,
    sentences: torch.Tensor,
    sentence_counts: torch.Tensor,
    t1: float = 4.0,
    t2: float = 5.0,
    t3: float = 10.0,
    impl: Impl = "auto",
) -> torch.Tensor:
    """Local beat-sentence loss (scalar); see ``kernels.reference.local_contrastive_loss``.

    No Triton kernel yet: "auto" runs the reference, "triton" raises ``ValueError``.
    """
    resolve_impl(impl, "local_contrastive_loss", [beats, sentences], has_triton=False)
    return reference.local_contrastive_loss(beats, sentences, sentence_counts, t1, t2, t3)
