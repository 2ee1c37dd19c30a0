"""DeepSpeed wiring: the ds.json, precision, optimiser, schedule and the engine.

ds.json's ``optimizer`` section (AdamW, betas, weight decay, lr) is honoured, but the optimiser
is built here as ``torch.optim.AdamW`` and handed to DeepSpeed (ZeRO-2 partitions any torch
optimiser): weight decay then applies to weight matrices only, not to biases, norms, learned
queries or the logit scale, and no DeepSpeed-specific CUDA op is needed on a CPU. The
schedule is a linear warm-up then a cosine (or linear) decay, stepped by the engine.
"""
from __future__ import annotations

import copy
import json
import math
import os
from typing import Any

import torch

PRECISION_KEYS = ("bf16", "fp16")


def load_ds_config(path: str, world_size: int, use_cuda: bool) -> tuple[dict[str, Any], str]:
    """Read and check ``path``; resolve ``"auto"`` precision; return (config, precision).

    Precision: bf16 on GPUs (unless ds.json disables it), fp32 on the CPU whatever ds.json says
    (CPU bf16 autocast through DeepSpeed is slow and untested).
    """
    if not os.path.isfile(path):
        raise ValueError(f"--ds_config {path!r} does not exist")
    with open(path, encoding="utf-8") as handle:
        try:
            config = json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(f"--ds_config {path!r} is not valid JSON: {error}") from error
    micro = config.get("train_micro_batch_size_per_gpu")
    accumulation = config.get("gradient_accumulation_steps", 1)
    if not isinstance(micro, int) or micro < 1:
        raise ValueError(f"{path}: set train_micro_batch_size_per_gpu to a positive integer")
    total = config.get("train_batch_size")
    if total is not None and total != micro * accumulation * world_size:
        raise ValueError(
            f"{path}: train_batch_size {total} != train_micro_batch_size_per_gpu {micro} x "
            f"gradient_accumulation_steps {accumulation} x world size {world_size}; remove "
            f"train_batch_size (it is derived) or make them agree")
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2):
        raise ValueError(f"{path}: zero_optimization.stage {stage} is not supported (use 0-2)")
    config = copy.deepcopy(config)
    precision = "fp32"
    for key in PRECISION_KEYS:
        section = config.get(key)
        if not section:
            continue
        enabled = section.get("enabled", False)
        if enabled == "auto":
            enabled = use_cuda and key == "bf16" and torch.cuda.is_bf16_supported()
        enabled = bool(enabled) and use_cuda
        section["enabled"] = enabled
        if enabled:
            precision = key
    return config, precision


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay on trainable matrices only (not biases, norms, queries, logit scale)."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        is_matrix = parameter.ndim >= 2 and "queries" not in name
        (decay if is_matrix else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, ds_config: dict[str, Any],
                    lr: float | None = None) -> torch.optim.Optimizer:
    """AdamW from ds.json's optimizer section (which is removed from ``ds_config``); ``lr``,
    when given, replaces the section's learning rate."""
    section = ds_config.pop("optimizer", None) or {"type": "AdamW", "params": {}}
    if section.get("type", "AdamW").lower() != "adamw":
        raise ValueError(f"ds.json optimizer.type {section.get('type')!r}: only AdamW is supported")
    params = dict(section.get("params", {}))
    unknown = set(params) - {"lr", "betas", "eps", "weight_decay"}
    if unknown:
        raise ValueError(f"ds.json optimizer.params: unknown {sorted(unknown)}")
    weight_decay = params.pop("weight_decay", 0.2)
    lr = lr if lr is not None else params.pop("lr", 2e-4)
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr,
                             betas=tuple(params.get("betas", (0.9, 0.95))),
                             eps=params.get("eps", 1e-8))


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                  min_ratio: float, decay: str = "cosine") -> torch.optim.lr_scheduler.LambdaLR:
    """lr x (step / warmup) during warm-up, then a cosine (or, with ``decay="linear"``, a
    straight line) from 1 to ``min_ratio``."""
    if decay not in ("cosine", "linear"):
        raise ValueError(f"optim.decay {decay!r}: choose 'cosine' or 'linear'")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if decay == "cosine" else 1 - progress
        return min_ratio + (1 - min_ratio) * shape

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
