"""Fused Triton ops of melp-scale with their PyTorch references (``kernels.reference``).

Public ops (each specified by the function of the same name in ``kernels.reference``):

    attention_pool(queries, keys, values, num_heads, key_padding_mask=None, impl="auto")
    local_contrastive_loss(beats, sentences, sentence_counts, t1=4.0, t2=5.0, t3=10.0, impl="auto")
    infonce_loss(x, t, logit_scale, group=None, impl="auto")

``impl``: "auto" (Triton for CUDA tensors, else the reference), "reference", or "triton"
(CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``). This package knows nothing
of ``melp_scale``; the nn.Modules wrapping these ops live there.
"""

from __future__ import annotations

from kernels import reference
from kernels.attention_pool import attention_pool  # rebinds `kernels.attention_pool` from the module to the op
from kernels.infonce import infonce_loss
from kernels.local_contrastive import local_contrastive_loss

__all__ = ["attention_pool", "infonce_loss", "local_contrastive_loss", "reference"]

