"""wav2vec-2.0-style ECG encoder (METHOD.md §2; ECG-FM / fairseq-signals layout).

ecg (B, 12, T) -> conv feature extractor (num_conv_layers x Conv1d(k=2, s=2), GroupNorm after
the first, GELU after each) -> (B, T // 16, 256) -> LayerNorm -> Linear -> dropout
-> + convolutional positional encoding -> LayerNorm -> post-LN Transformer -> (B, N, width).
With the paper sizes, 5000 samples give 312 tokens of 16 samples (32 ms at 500 Hz).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from .config import ECGEncoderConfig


class ConvFeatureExtractor(nn.Module):
    """Strided Conv1d stack: (B, C_in, T) -> (B, channels, T // 2**num_layers)."""

    def __init__(self, in_channels: int, channels: int, num_layers: int):
        super().__init__()
        layers: list[nn.Module] = []
        for index in range(num_layers):
            layers.append(nn.Conv1d(in_channels if index == 0 else channels, channels,
                                    kernel_size=2, stride=2, bias=False))
            if index == 0:
                # fairseq "default" mode: one GroupNorm with a group per channel, first layer only
                layers.append(nn.GroupNorm(channels, channels, affine=True))
            layers.append(nn.GELU())
        self.layers = nn.Sequential(*layers)
        for module in self.layers:
            if isinstance(module, nn.Conv1d):
                nn.init.kaiming_normal_(module.weight)

    def forward(self, ecg: torch.Tensor) -> torch.Tensor:
        return self.layers(ecg)


class ConvPositionalEncoding(nn.Module):
    """Grouped, weight-normalised Conv1d over the tokens, added to them (wav2vec 2.0)."""

    def __init__(self, width: int, kernel_size: int, groups: int, dropout: float):
        super().__init__()
        conv = nn.Conv1d(width, width, kernel_size, padding=kernel_size // 2, groups=groups)
        std = math.sqrt(4 * (1.0 - dropout) / (kernel_size * width))
        nn.init.normal_(conv.weight, mean=0.0, std=std)
        nn.init.zeros_(conv.bias)
        self.conv = weight_norm(conv, name="weight", dim=2)
        # an even kernel with padding k//2 yields one extra step: drop it ("SamePad")
        self.trim = 1 if kernel_size % 2 == 0 else 0

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.conv(tokens.transpose(1, 2))  # (B, D, N + trim)
        if self.trim:
            x = x[:, :, :-self.trim]
        return tokens + nn.functional.gelu(x).transpose(1, 2)  # (B, N, D)


class ECGEncoder(nn.Module):
    """ECG (B, leads, T) in [0, 1] -> tokens (B, T // 2**num_conv_layers, width)."""

    def __init__(self, config: ECGEncoderConfig):
        super().__init__()
        self.config = config
        self.feature_extractor = ConvFeatureExtractor(
            config.in_channels, config.conv_channels, config.num_conv_layers)
        self.feature_norm = nn.LayerNorm(config.conv_channels)
        self.input_proj = nn.Linear(config.conv_channels, config.width)
        self.input_dropout = nn.Dropout(config.dropout)
        self.pos_conv = ConvPositionalEncoding(
            config.width, config.pos_conv_kernel, config.pos_conv_groups, config.dropout)
        self.encoder_norm = nn.LayerNorm(config.width)
        self.layers = nn.ModuleList([
            nn.TransformerEncoderLayer(
                config.width, config.num_heads, config.ffn_dim, dropout=config.dropout,
                activation="gelu", batch_first=True, norm_first=False)
            for _ in range(config.num_layers)])

    def forward(self, ecg: torch.Tensor) -> torch.Tensor:
        if ecg.dim() != 3 or ecg.shape[1] != self.config.in_channels:
            raise ValueError(f"ecg must be (B, {self.config.in_channels}, T); got {tuple(ecg.shape)}")
        if ecg.shape[-1] < self.config.samples_per_token:
            raise ValueError(f"ecg has {ecg.shape[-1]} samples; need at least "
                             f"{self.config.samples_per_token} for one token")
        features = self.feature_extractor(ecg).transpose(1, 2)  # (B, N, C)
        x = self.input_dropout(self.input_proj(self.feature_norm(features)))  # (B, N, D)
        x = self.encoder_norm(self.pos_conv(x))  # post-LN layout: norm before the first layer
        x = self.input_dropout(x)
        for layer in self.layers:
            x = layer(x)
        return x  # (B, N, D)
