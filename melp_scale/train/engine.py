"""DeepSpeed wiring: the ds.json, precision, optimiser, schedule and the engine.

ds.json's ``optimizer`` section (AdamW, betas, weight decay, lr) is honoured, but the optimiser
is built here as ``torch.optim.AdamW`` and handed to DeepSpeed (ZeRO-2 partitions any torch
optimiser): weight decay then applies to weight matrices only, not to biases, norms, learned
queries or the logit scale, and no DeepSpeed-specific CUDA op is needed on a CPU. The
schedule is a linear warm-up then a cosine (or linear) decay, stepped by the engine.

A preset may override ds.json without editing it: its ``deepspeed:`` section (and
``deepspeed.KEY=value`` on the command line) is merged over the file, key by key
(:func:`apply_ds_overrides`); the effective global batch is micro-batch x accumulation x ranks
(:func:`batch_sizes`).

:func:`clamp_parameter_` bounds a parameter in the model and in the optimiser's fp32 master
copy: under ZeRO-1/2 (and DeepSpeed's bf16 optimiser) the optimiser steps a flat fp32
partition and re-casts the model weights from it after every step, so clamping the model copy
alone lets the master grow without bound.
"""
from __future__ import annotations

import copy
import json
import math
import os
from typing import Any

import torch

PRECISION_KEYS = ("bf16", "fp16")
# ds.json keys a preset's ``deepspeed:`` section may override (anything else is a typo or a
# setting the Trainer builds itself, such as the scheduler)
DS_OVERRIDE_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                    "train_batch_size", "gradient_clipping", "bf16", "fp16", "optimizer",
                    "zero_optimization", "torch_autocast")


def check_ds_overrides(overrides: dict[str, Any], where: str = "deepspeed") -> None:
    """ValueError naming the key when ``overrides`` holds a key DS_OVERRIDE_KEYS lacks."""
    if not isinstance(overrides, dict):
        raise ValueError(f"{where}: must be a mapping of ds.json keys, got {overrides!r}")
    unknown = sorted(set(overrides) - set(DS_OVERRIDE_KEYS))
    if unknown:
        raise ValueError(f"unknown config key(s) {[f'{where}.{k}' for k in unknown]}; a preset's "
                         f"deepspeed section may set: {', '.join(DS_OVERRIDE_KEYS)}")


def apply_ds_overrides(config: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """A copy of ``config`` with ``overrides`` merged in (mappings key by key, values replaced)."""
    merged = copy.deepcopy(config)
    if not overrides:
        return merged
    check_ds_overrides(overrides)

    def merge(node: dict[str, Any], update: dict[str, Any]) -> None:
        for key, value in update.items():
            if isinstance(value, dict) and isinstance(node.get(key), dict):
                merge(node[key], value)
            else:
                node[key] = copy.deepcopy(value)

    merge(merged, overrides)
    return merged


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_ds_values(config: dict[str, Any], path: str) -> None:
    """ValueError naming the ds.json key whose value has the wrong type or range (the values
    the Trainer reads: clipping, batch sizes, the AdamW parameters, precision switches)."""
    def fail(key: str, must: str, value: Any) -> None:
        raise ValueError(f"{path}: {key} must be {must}, got {value!r}")

    clipping = config.get("gradient_clipping", 0.0)
    if not _number(clipping) or clipping < 0:
        fail("gradient_clipping", "a number >= 0 (0: no clipping)", clipping)
    total = config.get("train_batch_size")
    if total is not None and (not isinstance(total, int) or isinstance(total, bool) or total < 1):
        fail("train_batch_size", "a positive integer", total)
    for key in ("optimizer", "zero_optimization", *PRECISION_KEYS, "torch_autocast"):
        if key in config and not isinstance(config[key], dict):
            fail(key, "a mapping", config[key])
    for key in (*PRECISION_KEYS, "torch_autocast"):
        enabled = (config.get(key) or {}).get("enabled", False)
        if enabled not in (True, False, "auto"):
            fail(f"{key}.enabled", 'true, false or "auto"', enabled)
    params = (config.get("optimizer") or {}).get("params", {})
    if not isinstance(params, dict):
        fail("optimizer.params", "a mapping", params)
    for key, low in (("lr", 0.0), ("eps", 0.0)):
        if key in params and (not _number(params[key]) or params[key] <= low):
            fail(f"optimizer.params.{key}", "a number > 0", params[key])
    decay = params.get("weight_decay", 0.0)
    if not _number(decay) or decay < 0:
        fail("optimizer.params.weight_decay", "a number >= 0", decay)
    betas = params.get("betas", (0.9, 0.95))
    if (not isinstance(betas, (list, tuple)) or len(betas) != 2
            or not all(_number(b) and 0 <= b < 1 for b in betas)):
        fail("optimizer.params.betas", "two numbers in [0, 1)", betas)


def batch_sizes(config: dict[str, Any], world_size: int) -> dict[str, int]:
    """micro (per rank), accumulation, world size and the global batch they make."""
    micro = config["train_micro_batch_size_per_gpu"]
    accumulation = config.get("gradient_accumulation_steps", 1)
    return {"micro": micro, "accumulation": accumulation, "world_size": world_size,
            "global": micro * accumulation * world_size}


def describe_batch(sizes: dict[str, int]) -> str:
    """'global batch 256 = 64 per rank x 1 accumulation step(s) x 4 rank(s)'."""
    return (f"global batch {sizes['global']} = {sizes['micro']} per rank x {sizes['accumulation']} "
            f"accumulation step(s) x {sizes['world_size']} rank(s)")


def load_ds_config(path: str, world_size: int, use_cuda: bool,
                   overrides: dict[str, Any] | None = None) -> tuple[dict[str, Any], str]:
    """Read and check ``path`` with a preset's ``overrides`` merged in; resolve ``"auto"``
    precision; return (config, precision).

    Precision: bf16 on GPUs (unless ds.json disables it), fp32 on the CPU whatever ds.json says
    (CPU bf16 autocast through DeepSpeed is slow and untested). DeepSpeed's ``bf16`` keeps the
    model's weights in bf16 and an fp32 master copy in the optimiser; ``torch_autocast``
    (``{"enabled": true, "dtype": "bfloat16"}``, GPUs only) keeps fp32 weights and runs the
    forward under bf16 autocast instead, and then replaces ``bf16``.
    """
    if not os.path.isfile(path):
        raise ValueError(f"--ds_config {path!r} does not exist")
    with open(path, encoding="utf-8") as handle:
        try:
            config = json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(f"--ds_config {path!r} is not valid JSON: {error}") from error
    config = apply_ds_overrides(config, overrides)
    if overrides:
        path = f"{path} + the preset's deepspeed overrides"
    micro = config.get("train_micro_batch_size_per_gpu")
    accumulation = config.get("gradient_accumulation_steps", 1)
    if not isinstance(micro, int) or isinstance(micro, bool) or micro < 1:
        raise ValueError(f"{path}: set train_micro_batch_size_per_gpu to a positive integer")
    if not isinstance(accumulation, int) or isinstance(accumulation, bool) or accumulation < 1:
        raise ValueError(f"{path}: gradient_accumulation_steps must be a positive integer, "
                         f"got {accumulation!r}")
    check_ds_values(config, path)
    total = config.get("train_batch_size")
    if total is not None and total != micro * accumulation * world_size:
        raise ValueError(
            f"{path}: train_batch_size {total} != train_micro_batch_size_per_gpu {micro} x "
            f"gradient_accumulation_steps {accumulation} x world size {world_size}; remove "
            f"train_batch_size (it is derived) or make them agree")
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2):
        raise ValueError(f"{path}: zero_optimization.stage {stage} is not supported (use 0-2)")
    precision = "fp32"
    autocast = config.get("torch_autocast")
    if autocast:
        enabled = autocast.get("enabled", False)
        enabled = (use_cuda and torch.cuda.is_bf16_supported()) if enabled == "auto" else bool(enabled)
        autocast["enabled"] = enabled and use_cuda
        if autocast["enabled"]:
            autocast.setdefault("dtype", "bfloat16")
            for key in PRECISION_KEYS:  # fp32 weights: no bf16/fp16 weight mode besides
                if config.get(key):
                    config[key]["enabled"] = False
            return config, f"{autocast['dtype']} autocast, fp32 weights"
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


def fused_adamw_supported(parameters: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW kernel takes these parameters: floating point, all on one
    device type that has the kernel (CPU and CUDA in torch >= 2.4)."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    devices = {p.device.type for p in parameters}
    return (len(devices) == 1 and devices <= set(_get_fused_kernels_supported_devices())
            and all(torch.is_floating_point(p) for p in parameters))


def resolve_fused(fused: bool | str, parameters: list[torch.Tensor]) -> bool:
    """``optim.fused``: "auto" -> on where supported; True where unsupported is a ValueError."""
    if fused not in ("auto", True, False):
        raise ValueError(f"optim.fused must be true, false or \"auto\", got {fused!r}")
    supported = fused_adamw_supported(parameters)
    if fused is True and not supported:
        devices = sorted({p.device.type for p in parameters})
        raise ValueError(f"optim.fused=true: torch {torch.__version__} has no fused AdamW for "
                         f"parameters on {devices}; use optim.fused=auto or false")
    return supported if fused == "auto" else bool(fused)


def build_optimizer(model: torch.nn.Module, ds_config: dict[str, Any],
                    lr: float | None = None, fused: bool | str = "auto") -> torch.optim.Optimizer:
    """AdamW from ds.json's optimizer section (which is removed from ``ds_config``); ``lr``,
    when given, replaces the section's learning rate.

    ``fused`` (``optim.fused``): torch's fused AdamW kernel, one op over all tensors instead of
    the default per-parameter loop. It computes the same update (equal to fp32 rounding:
    tests/test_levers.py, also under ZeRO-2, where DeepSpeed hands the optimiser flat fp32
    partitions in place of the parameters); "auto" (the default) turns it on where the device
    has it."""
    section = ds_config.pop("optimizer", None) or {"type": "AdamW", "params": {}}
    if section.get("type", "AdamW").lower() != "adamw":
        raise ValueError(f"ds.json optimizer.type {section.get('type')!r}: only AdamW is supported")
    params = dict(section.get("params", {}))
    unknown = set(params) - {"lr", "betas", "eps", "weight_decay"}
    if unknown:
        raise ValueError(f"ds.json optimizer.params: unknown {sorted(unknown)}")
    weight_decay = params.pop("weight_decay", 0.2)
    lr = lr if lr is not None else params.pop("lr", 2e-4)
    groups = param_groups(model, weight_decay)
    use_fused = resolve_fused(fused, [p for group in groups for p in group["params"]])
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(params.get("betas", (0.9, 0.95))),
                             eps=params.get("eps", 1e-8), fused=use_fused)


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


@torch.no_grad()
def clamp_parameter_(parameter: torch.nn.Parameter, low: float, high: float) -> None:
    """Clamp ``parameter`` to [low, high] in the model and in this rank's piece of the
    optimiser's fp32 master copy; call on every rank after each optimiser step.

    DeepSpeed links each model parameter of a ZeRO-1/2 (or bf16) optimiser to its fragment of
    the rank's flat fp32 partition (``_hp_mapping``, None where another rank owns it); the
    fragment is clamped in place, no communication needed. Without such a link (ZeRO-0 in
    fp32) the optimiser steps the model parameter itself. The gradient is untouched: inside
    the bounds it is the ordinary one, as when the stored value is clamped after each batch.
    """
    if hasattr(parameter, "ds_id"):
        raise ValueError("clamp_parameter_: ZeRO-3 partitioned parameters are not supported")
    parameter.clamp_(low, high)
    mapping = getattr(parameter, "_hp_mapping", None)
    if mapping is not None:
        mapping.get_hp_fragment().clamp_(low, high)


def master_copy(parameter: torch.nn.Parameter) -> torch.Tensor:
    """The optimiser's full fp32 master copy of ``parameter`` (a collective under ZeRO: call
    on every rank); the parameter itself (as fp32) when the optimiser keeps no other copy."""
    from deepspeed.utils import safe_get_full_fp32_param

    value = safe_get_full_fp32_param(parameter)
    return parameter.detach().float().clone() if value is None else value
