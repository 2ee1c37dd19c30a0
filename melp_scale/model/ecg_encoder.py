"""wav2vec-2.0-style ECG encoder (as in the MELP paper), structured like the official MELP backbone
(fairseq-signals ``Wav2Vec2CMSCModel`` run with ``mask=False, features_only=True``).

ecg (B, 12, T) -> conv feature extractor (num_conv_layers x Conv1d(k=2, s=2, no bias); block 0:
conv -> GroupNorm(one group per channel, fp32) -> GELU, the others conv -> GELU)
-> GradMultiply(feature_grad_mult): identity forward, gradient x 0.1 into the conv stack
-> (B, N, 256) -> ``layer_norm`` -> ``post_extract_proj`` -> dropout
-> x + GELU(SamePad(grouped weight-normalised Conv1d(x)))   (convolutional positions)
-> ``encoder_norm`` (post-LN stack: this LayerNorm comes BEFORE layer 0) -> dropout
-> post-LN layers (separate q/k/v/out projections, GELU FFN) -> (B, N, width).
With the paper sizes, 5000 samples give 312 tokens of 16 samples (32 ms at 500 Hz).

Initialisation follows the official code (whose ``init_bert_params`` call is commented out):
convs Kaiming-normal; positional conv N(0, sqrt(4 / (kernel * width))), zero bias; attention q/k/v
Xavier-uniform with gain 1/sqrt(2), output Xavier-uniform with zero bias; every other Linear and
LayerNorm the PyTorch default. Parameter names mirror the official ones (``conv_layers.{i}.0``,
``self_attn.q_proj``, ``fc1`` ...), so the converter (``melp_scale.convert``) maps them 1:1.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm
from torch.utils.checkpoint import checkpoint

from .attention import attention
from .config import ECGEncoderConfig


class GradMultiply(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by ``scale``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


class Fp32GroupNorm(nn.GroupNorm):
    """GroupNorm computed in fp32 (and cast back), as fairseq's ``Fp32GroupNorm``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps)
        return out.type_as(x)


class ConvFeatureExtractor(nn.Module):
    """Strided Conv1d stack: (B, C_in, T) -> (B, channels, T // 2**num_layers)."""

    def __init__(self, in_channels: int, channels: int, num_layers: int):
        super().__init__()
        blocks = []
        for index in range(num_layers):
            conv = nn.Conv1d(in_channels if index == 0 else channels, channels,
                             kernel_size=2, stride=2, bias=False)
            nn.init.kaiming_normal_(conv.weight)
            # fairseq "default" mode: a GroupNorm with a group per channel, first block only
            norm = [Fp32GroupNorm(channels, channels, affine=True)] if index == 0 else []
            blocks.append(nn.Sequential(conv, nn.Dropout(0.0), *norm, nn.GELU()))
        self.conv_layers = nn.ModuleList(blocks)

    def forward(self, ecg: torch.Tensor) -> torch.Tensor:
        for block in self.conv_layers:
            ecg = block(ecg)
        return ecg


def _buffer(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """Uninitialised output buffer (every element is written; tests poison it)."""
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def _fft_size(padded: int) -> int:
    """Transform length: the padded input's (no wrap-around), rounded up to a multiple of 32."""
    return -(-padded // 32) * 32


def _group_slices(weight: torch.Tensor, groups: int):
    """(output channels, input channels) of each group of a grouped convolution's weight."""
    per_group, group_in = weight.shape[0] // groups, weight.shape[1]
    for g in range(groups):
        yield slice(g * per_group, (g + 1) * per_group), slice(g * group_in, (g + 1) * group_in)


class FFTGroupedConv1d(torch.autograd.Function):
    """Grouped cross-correlation through the FFT, one group at a time, with its own backward.

    y[b, o, t] = Σ_c Σ_k w[o, c, k] · xp[b, c, t + k]   (xp: x zero-padded on both sides)
    In the frequency domain (transform length n ≥ the padded length, so nothing wraps around):
      Y[b, o] = Σ_c conj(W[o, c]) · X[b, c]                         y = irfft(Y)[:out_len]
      ∂xp: a full convolution of ∂y with w,  FFT: Σ_o W[o, c] · ∂Y[b, o]          (then cropped)
      ∂w:  a correlation of xp with ∂y,      FFT: Σ_b conj(∂Y[b, o]) · X[b, c]    (first k taps)
    It saves only x and w and recomputes their spectra in the backward; the kernel's spectrum
    (out x in/g x n/2+1 complex, 3.5x the kernel's size at the paper sizes) exists for one group
    at a time, so the step's peak carries no full spectrum beside the gradients.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, padding: int, groups: int) -> torch.Tensor:
        batch, _, length = x.shape
        out_channels, _, kernel = weight.shape
        out_len = length + 2 * padding - kernel + 1
        size = _fft_size(length + 2 * padding)
        spectrum = torch.fft.rfft(F.pad(x, (padding, padding)), n=size)  # (B, C, F)
        out = _buffer((batch, out_channels, out_len), x)
        for outs, ins in _group_slices(weight, groups):
            kernel_spectrum = torch.fft.rfft(weight[outs], n=size).conj_physical_()  # (O/g, C/g, F)
            # per frequency: (O/g x C/g) @ (C/g x B)
            mixed = torch.matmul(kernel_spectrum.permute(2, 0, 1), spectrum[:, ins].permute(2, 1, 0))
            out[:, outs] = torch.fft.irfft(mixed.permute(2, 1, 0), n=size)[..., :out_len]
        ctx.save_for_backward(x, weight)
        ctx.padding, ctx.groups = padding, groups
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        padding, groups = ctx.padding, ctx.groups
        length, kernel = x.shape[-1], weight.shape[-1]
        size = _fft_size(length + 2 * padding)
        grad_spectrum = torch.fft.rfft(grad_out, n=size)  # (B, O, F)
        need_x, need_w = ctx.needs_input_grad[:2]
        spectrum = torch.fft.rfft(F.pad(x, (padding, padding)), n=size) if need_w else None
        grad_x = _buffer(x.shape, x) if need_x else None
        grad_w = _buffer(weight.shape, weight) if need_w else None
        for outs, ins in _group_slices(weight, groups):
            grad_g = grad_spectrum[:, outs].permute(2, 1, 0)  # (F, O/g, B)
            if need_x:
                kernel_spectrum = torch.fft.rfft(weight[outs], n=size)  # (O/g, C/g, F)
                mixed = torch.matmul(kernel_spectrum.permute(2, 1, 0), grad_g)  # (F, C/g, B)
                full = torch.fft.irfft(mixed.permute(2, 1, 0), n=size)  # (B, C/g, n): ∂xp
                grad_x[:, ins] = full[..., padding:padding + length]
            if need_w:
                mixed = torch.matmul(grad_g.conj(), spectrum[:, ins].permute(2, 0, 1))  # (F, O/g, C/g)
                grad_w[outs] = torch.fft.irfft(mixed.permute(1, 2, 0), n=size)[..., :kernel]
        return grad_x, grad_w, None, None


def fft_grouped_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       padding: int, groups: int) -> torch.Tensor:
    """``F.conv1d(x, weight, bias, padding=padding, groups=groups)`` through the FFT.

    A cross-correlation is a product of spectra (the input's times the kernel's conjugate), and
    the channel mixing of each group is, per frequency, a (out x in) complex matrix product. For
    the paper's positional convolution (kernel 128, 16 groups of 48 channels, 312 tokens) that
    is 0.6 GFLOP forward at batch 8 instead of the direct 23.6. :class:`FFTGroupedConv1d` does
    it a group at a time and keeps only x and the weight for the backward. Computed in fp32
    (fp64 stays fp64), outside autocast.
    """
    if x.dim() != 3 or weight.dim() != 3 or x.shape[1] != weight.shape[1] * groups \
            or weight.shape[0] % groups:
        raise ValueError(f"fft_grouped_conv1d: x {tuple(x.shape)} and weight {tuple(weight.shape)} "
                         f"do not make a conv1d with {groups} groups")
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    with torch.autocast(x.device.type, enabled=False):
        out = FFTGroupedConv1d.apply(x.to(dtype), weight.to(dtype), padding, groups)
        if bias is not None:
            out = out + bias.to(dtype)[:, None]
    return out.to(x.dtype)


class ConvPositionalEncoding(nn.Module):
    """Grouped Conv1d over the tokens, weight-normalised over dims (0, 1) (one norm per kernel
    position), SamePad (an even kernel drops the last step), GELU; added to the tokens.
    ``fft``: the same convolution through :func:`fft_grouped_conv1d`."""

    def __init__(self, width: int, kernel_size: int, groups: int, fft: bool = False):
        super().__init__()
        conv = nn.Conv1d(width, width, kernel_size, padding=kernel_size // 2, groups=groups)
        nn.init.normal_(conv.weight, mean=0.0, std=math.sqrt(4.0 / (kernel_size * width)))
        nn.init.zeros_(conv.bias)
        self.conv = weight_norm(conv, name="weight", dim=2)
        self.trim = 1 if kernel_size % 2 == 0 else 0
        self.fft = fft

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.fft:
            conv = self.conv
            x = fft_grouped_conv1d(tokens.transpose(1, 2), conv.weight, conv.bias,
                                   conv.padding[0], conv.groups)
        else:
            x = self.conv(tokens.transpose(1, 2))  # (B, D, N + trim)
        if self.trim:
            x = x[:, :, :-self.trim]
        return tokens + F.gelu(x).transpose(1, 2)  # (B, N, D)


class SelfAttention(nn.Module):
    """fairseq MultiHeadAttention layout: separate q/k/v/out Linear layers with bias."""

    def __init__(self, width: int, num_heads: int, dropout: float, recompute: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.recompute = recompute  # melp_scale.model.attention: CPU dropout path keeps no N x N
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(width, width) for _ in range(4))
        for projection in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.xavier_uniform_(projection.weight, gain=1 / math.sqrt(2))
        nn.init.xavier_uniform_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = (proj(x).view(batch, length, self.num_heads, -1).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))  # (B, h, N, d)
        out = attention(q, k, v, self.dropout if self.training else 0.0, recompute=self.recompute)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width))


class EncoderLayer(nn.Module):
    """Post-LN: x = LN(x + drop(MHA(x))); x = LN(x + drop(fc2(act_drop(GELU(fc1(x))))))."""

    def __init__(self, config: ECGEncoderConfig):
        super().__init__()
        self.self_attn = SelfAttention(config.width, config.num_heads, config.attention_dropout,
                                       config.attention_recompute)
        self.self_attn_layer_norm = nn.LayerNorm(config.width)
        self.fc1 = nn.Linear(config.width, config.ffn_dim)
        self.fc2 = nn.Linear(config.ffn_dim, config.width)
        self.final_layer_norm = nn.LayerNorm(config.width)
        self.dropout = nn.Dropout(config.dropout)
        self.activation_dropout = nn.Dropout(config.activation_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.self_attn_layer_norm(x + self.dropout(self.self_attn(x)))
        hidden = self.fc2(self.activation_dropout(F.gelu(self.fc1(x))))
        return self.final_layer_norm(x + self.dropout(hidden))


class ECGEncoder(nn.Module):
    """ECG (B, leads, T) in [0, 1] -> tokens (B, T // 2**num_conv_layers, width)."""

    def __init__(self, config: ECGEncoderConfig):
        super().__init__()
        self.config = config
        self.feature_extractor = ConvFeatureExtractor(
            config.in_channels, config.conv_channels, config.num_conv_layers)
        self.layer_norm = nn.LayerNorm(config.conv_channels)
        self.post_extract_proj = nn.Linear(config.conv_channels, config.width)
        self.input_dropout = nn.Dropout(config.dropout)
        self.pos_conv = ConvPositionalEncoding(config.width, config.pos_conv_kernel, config.pos_conv_groups,
                                               config.pos_conv_fft)
        self.encoder_norm = nn.LayerNorm(config.width)
        self.layers = nn.ModuleList([EncoderLayer(config) for _ in range(config.num_layers)])

    def forward(self, ecg: torch.Tensor) -> torch.Tensor:
        if ecg.dim() != 3 or ecg.shape[1] != self.config.in_channels:
            raise ValueError(f"ecg must be (B, {self.config.in_channels}, T); got {tuple(ecg.shape)}")
        if ecg.shape[-1] < self.config.samples_per_token:
            raise ValueError(f"ecg has {ecg.shape[-1]} samples; need at least "
                             f"{self.config.samples_per_token} for one token")
        features = self.feature_extractor(ecg)  # (B, C, N)
        if self.config.feature_grad_mult != 1.0:
            features = GradMultiply.apply(features, self.config.feature_grad_mult)
        x = self.layer_norm(features.transpose(1, 2))  # (B, N, C)
        x = self.input_dropout(self.post_extract_proj(x))  # (B, N, D)
        x = self.input_dropout(self.encoder_norm(self.pos_conv(x)))  # post-LN: norm before layer 0
        checkpointed = self.config.checkpoint_layers and torch.is_grad_enabled()
        for layer in self.layers:  # checkpointing replays dropout with the saved RNG state
            x = checkpoint(layer, x, use_reentrant=False) if checkpointed else layer(x)
        return x  # (B, N, D)
