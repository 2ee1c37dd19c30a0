"""FLOPs of one MELP training step, per component, from the config and the batch shape; MFU.

What is counted: the matrix products (Linear, Conv1d, attention's two batched products, the
loss einsums), 2 FLOPs per multiply-add — the convention of model FLOPs utilisation (MFU) and
of ``torch.utils.flop_counter.FlopCounterMode``, which ``tests/test_flops.py`` checks this
count against. Norms, softmax, activations and the optimiser step are not counted (a few % of
the products at the paper sizes).

Backward: a product ``y = x W`` costs its forward once for the weight gradient (when W is
trained) and once for the input gradient (when x needs one). So the first ECG conv (raw input,
no gradient) costs 1x, a frozen text layer 0x when nothing below it trains (demo: embeddings
frozen too) and 1x for its Linears and 2x for its attention when the trainable embeddings
below it need its input gradient (paper), and everything else 2x. Attention counts the full
L x L products also when causal (what the kernels compute, and what FlopCounterMode counts).

Data-dependent sizes come from the batch (:func:`step_shape`): the text length after padding
is trimmed, the real caption targets (the vocabulary projection runs on those only), the
largest sentence count, the ranks InfoNCE gathers over.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from melp_scale.model.config import MELPConfig

COMPONENTS = ("ecg_encoder", "beat_pooler", "caption_pooler", "text_frozen", "text_trainable",
              "text_heads", "decoder", "vocab_projection", "losses")
"""Rows of :func:`step_flops`, in the order of the forward pass."""

# Dense bf16 tensor-core peaks (FLOP/s, no sparsity) from the vendors' data sheets. Matched
# against torch.cuda.get_device_name() in this order: the more specific names come first.
BF16_PEAKS: tuple[tuple[str, float], ...] = (
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("L4", 121e12),
    ("A6000", 155e12),
    ("RTX 4090", 165e12),
)


@dataclass
class TextSizes:
    """The text encoder's sizes (a BERT-family model)."""

    hidden: int
    """Hidden size = the decoder width."""
    layers: int
    """Transformer layers."""
    intermediate: int
    """Feed-forward hidden size."""
    vocab: int
    """Vocabulary size (with the added [BOS])."""


@dataclass
class StepShape:
    """The sizes of one micro-batch that the FLOPs depend on."""

    batch: int
    """ECG/report pairs on this rank."""
    ecg_samples: int
    """Samples per lead."""
    text_length: int
    """Token columns after the all-padding ones are trimmed."""
    caption_targets: int
    """Real next-token targets in the batch (the vocabulary projection's rows)."""
    sentences: int
    """Sentence slots (the largest sentence count, at least 1)."""
    world_size: int = 1
    """Ranks the InfoNCE gathers its negatives from."""


def text_sizes_of(model: torch.nn.Module) -> TextSizes:
    """The sizes of a built ``MELP`` model's text encoder."""
    hf = model.text.bert.config
    return TextSizes(hidden=hf.hidden_size, layers=hf.num_hidden_layers,
                     intermediate=hf.intermediate_size, vocab=model.text.vocab_size)


def step_shape(batch: Mapping[str, Any], world_size: int = 1) -> StepShape:
    """The :class:`StepShape` of a loader batch (ecg, attention_mask, sentence_index,
    sentence_counts), computed as ``MELP.forward`` trims and masks it."""
    lengths = batch["attention_mask"].sum(dim=-1).long()
    counts = torch.minimum(batch["sentence_counts"].long(),
                           batch["sentence_index"].max(dim=-1).values.clamp(min=-1) + 1)
    return StepShape(batch=int(lengths.shape[0]), ecg_samples=int(batch["ecg"].shape[-1]),
                     text_length=max(int(lengths.max()), 1),
                     caption_targets=int((lengths - 2).clamp(min=0).sum()),
                     sentences=max(int(counts.max()), 1), world_size=world_size)


def _mm(flops: float, weight_grad: bool, input_grad: bool) -> tuple[float, float]:
    """(forward, backward) of one product: backward = forward per gradient computed."""
    return flops, flops * (int(weight_grad) + int(input_grad))


def _add(*parts: tuple[float, float]) -> tuple[float, float]:
    return sum(p[0] for p in parts), sum(p[1] for p in parts)


def _attention_core(batch: int, queries: int, keys: int, width: int, grad: bool) -> tuple[float, float]:
    """softmax(QKᵀ)V over all heads: two products of 2·B·Lq·Lk·D each."""
    return _mm(4.0 * batch * queries * keys * width, grad, grad)


def _ecg_encoder(config: MELPConfig, shape: StepShape) -> tuple[tuple[float, float], int]:
    ecg, batch = config.ecg, shape.batch
    length, parts, channels = shape.ecg_samples, [], ecg.in_channels
    for index in range(ecg.num_conv_layers):  # Conv1d(k=2, s=2): floor(L / 2) outputs
        length //= 2
        flops = 2.0 * batch * length * ecg.conv_channels * channels * 2
        parts.append(_mm(flops, True, index > 0))  # the raw ECG needs no gradient
        channels = ecg.conv_channels
    tokens, width = length, ecg.width
    parts.append(_mm(2.0 * batch * tokens * ecg.conv_channels * width, True, True))  # post_extract_proj
    kernel = ecg.pos_conv_kernel
    pos_length = tokens + 2 * (kernel // 2) - kernel + 1
    parts.append(_mm(2.0 * batch * pos_length * width * (width // ecg.pos_conv_groups) * kernel, True, True))
    per_layer = _add(_mm(8.0 * batch * tokens * width * width, True, True),  # q, k, v, out
                     _attention_core(batch, tokens, tokens, width, True),
                     _mm(4.0 * batch * tokens * width * ecg.ffn_dim, True, True))  # fc1, fc2
    parts += [per_layer] * ecg.num_layers
    return _add(*parts), tokens


def _pooler(batch: int, tokens: int, context: int, dim: int, queries: int) -> tuple[float, float]:
    return _add(_mm(2.0 * queries * dim * dim, True, True),  # q_proj of the shared queries
                _mm(4.0 * batch * tokens * context * dim, True, True),  # k_proj, v_proj
                _attention_core(batch, queries, tokens, dim, True),
                _mm(2.0 * batch * queries * dim * dim, True, True))  # out_proj


def _text_layer(batch: int, length: int, text: TextSizes, train: bool, qkv_input_grad: bool,
                later_input_grad: bool) -> tuple[float, float]:
    hidden = text.hidden
    return _add(_mm(6.0 * batch * length * hidden * hidden, train, qkv_input_grad),  # q, k, v
                _attention_core(batch, length, length, hidden, train or qkv_input_grad),
                _mm(2.0 * batch * length * hidden * hidden, train, later_input_grad),  # out
                _mm(4.0 * batch * length * hidden * text.intermediate, train, later_input_grad))


def _text(config: MELPConfig, text: TextSizes, shape: StepShape) -> dict[str, tuple[float, float]]:
    batch, length, frozen = shape.batch, shape.text_length, config.text.num_frozen_layers
    grad_below = not config.text.freeze_embeddings  # the trainable embeddings need the input gradient
    rows = {"text_frozen": (0.0, 0.0), "text_trainable": (0.0, 0.0)}
    for index in range(text.layers):
        train = index >= frozen
        layer = _text_layer(batch, length, text, train, grad_below or index > frozen,
                            grad_below or train)
        key = "text_trainable" if train else "text_frozen"
        rows[key] = _add(rows[key], layer)
    states_grad = grad_below or frozen < text.layers
    embed = config.pooler.embed_dim
    rows["text_heads"] = _add(
        _mm(2.0 * batch * (text.hidden * embed + embed * embed), True, states_grad),  # global head
        _mm(2.0 * batch * shape.sentences * length * text.hidden, False, states_grad),  # sentence sums
        _mm(2.0 * batch * shape.sentences * text.hidden * embed, True, states_grad))  # sentence_proj
    return rows


def _decoder(config: MELPConfig, text: TextSizes, shape: StepShape, input_grad: bool) -> tuple[float, float]:
    batch, length, width = shape.batch, max(shape.text_length - 1, 0), text.hidden
    memory, mlp = config.pooler.num_caption_queries, int(width * config.decoder.mlp_ratio)
    parts = []
    for index in range(config.decoder.num_layers):
        parts += [_mm(6.0 * batch * length * width * width, True, input_grad or index > 0),  # in_proj
                  _attention_core(batch, length, length, width, True),
                  _mm(2.0 * batch * length * width * width, True, True),  # out_proj
                  _mm(2.0 * batch * length * width * width, True, True),  # cross q
                  _mm(4.0 * batch * memory * width * width, True, True),  # cross k, v
                  _attention_core(batch, length, memory, width, True),
                  _mm(2.0 * batch * length * width * width, True, True),  # cross out_proj
                  _mm(8.0 * batch * length * width * mlp, True, True)]  # two MLPs
    return _add(*parts)


def _losses(config: MELPConfig, shape: StepShape) -> tuple[float, float]:
    batch, embed = shape.batch, config.pooler.embed_dim
    negatives = batch * shape.world_size
    infonce = _mm(2.0 * batch * negatives * embed * (2 if shape.world_size > 1 else 1), True, True)
    beats, sentences = config.pooler.num_beat_queries, shape.sentences
    local = _mm(2.0 * batch * batch * sentences * embed * (2 * beats + 1), True, True)
    return _add(infonce, local)


def step_flops(config: MELPConfig, text: TextSizes, shape: StepShape) -> dict[str, dict[str, float]]:
    """``{component: {"forward", "backward", "total"}}`` for :data:`COMPONENTS` plus ``"total"``."""
    ecg, tokens = _ecg_encoder(config, shape)
    rows = {"ecg_encoder": ecg,
            "beat_pooler": _add(_pooler(shape.batch, tokens, config.ecg.width, config.pooler.embed_dim,
                                        config.pooler.num_beat_queries),
                                _mm(2.0 * shape.batch * config.pooler.num_beat_queries
                                    * config.pooler.embed_dim ** 2, True, True)),  # proj_contrast
            "caption_pooler": _pooler(shape.batch, tokens, config.ecg.width, text.hidden,
                                      config.pooler.num_caption_queries)}
    rows.update(_text(config, text, shape))
    text_grad = not config.text.freeze_embeddings or config.text.num_frozen_layers < text.layers
    decoder_grad = text_grad if config.text.causal else not config.text.freeze_embeddings
    rows["decoder"] = _decoder(config, text, shape, decoder_grad)
    rows["vocab_projection"] = _mm(2.0 * shape.caption_targets * text.hidden * text.vocab, True, True)
    rows["losses"] = _losses(config, shape)
    out = {name: {"forward": rows[name][0], "backward": rows[name][1],
                  "total": rows[name][0] + rows[name][1]} for name in COMPONENTS}
    out["total"] = {key: sum(out[name][key] for name in COMPONENTS)
                    for key in ("forward", "backward", "total")}
    return out


def peak_bf16_flops(device: torch.device | str | None = None) -> tuple[str | None, float | None]:
    """(name, dense bf16 FLOP/s) of ``device`` from :data:`BF16_PEAKS`; (None, None) on a CPU
    or an unknown GPU (MFU is then reported as n/a)."""
    device = torch.device(device) if device is not None else None
    if device is None or device.type != "cuda" or not torch.cuda.is_available():
        return None, None
    return peak_for_name(torch.cuda.get_device_name(device))


def peak_for_name(device_name: str) -> tuple[str | None, float | None]:
    """(table name, dense bf16 FLOP/s) for a CUDA device name; (None, None) when unknown."""
    for name, peak in BF16_PEAKS:
        if name in device_name:
            return name, peak
    return None, None


def throughput(flops: float, seconds: float, peak: float | None) -> dict[str, float | None]:
    """Achieved TFLOP/s of ``flops`` done in ``seconds`` (per device) and the MFU against
    ``peak`` (None when the peak is unknown: CPU or an unlisted GPU)."""
    achieved = flops / max(seconds, 1e-12)
    return {"tflops_per_s": achieved / 1e12, "mfu": achieved / peak if peak else None}


def format_flops(rows: dict[str, dict[str, float]]) -> str:
    """A table of GFLOP per component (forward, backward, total, share)."""
    total = rows["total"]["total"] or 1.0
    lines = [f"{'component':<18}{'fwd GFLOP':>11}{'bwd GFLOP':>11}{'total':>11}{'share':>8}"]
    for name, row in rows.items():
        lines.append(f"{name:<18}{row['forward'] / 1e9:>11.1f}{row['backward'] / 1e9:>11.1f}"
                     f"{row['total'] / 1e9:>11.1f}{row['total'] / total:>8.1%}")
    return "\n".join(lines)
