"""Linear probe (the MELP paper's protocol): one linear layer on frozen ECG features, multi-label.

- Features: ``MELP.ecg_features`` (mean of the pooled beats before ``proj_contrast``),
  extracted once per checkpoint and shard set and cached (data.py).
- Training subset: a fraction f of the task's train split, the first ``ceil(f * n)`` rows of a
  permutation seeded by ``seed`` (so the 1 % rows are a subset of the 10 % rows); val and
  test are always whole.
- Inputs are standardised with the training subset's mean and s.d.: an affine map that folds
  into the linear layer (the model is still one linear layer), only for better-conditioned
  optimisation.
- Model: ``nn.Linear(E, C)``, ``BCEWithLogitsLoss`` (multi-label: classes are independent,
  never a softmax), AdamW (lr 1e-3, weight decay 1e-4), cosine schedule per step down to
  1e-5, mini-batches of ``batch_size``, at most ``epochs`` epochs; after each epoch the val
  macro AUC is measured, the best weights kept, and training stops after ``patience`` epochs
  without improvement (with no val row, or no class defined on val, the last epoch is kept).
- Test: macro / per-class ROC-AUC of the sigmoid scores on the test split, with bootstrap CIs
  (``auc_scores="softmax"``: of a softmax over the classes' logits, a labelled compatibility
  option only: it makes the classes of a multi-label task compete).
- Presets: ``ours`` (batch 16, patience 10: the 1 % subsets have few rows) and ``official``
  (the published code's batch 128, patience 5); the preset is named in the results.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch
from torch import nn

from melp_scale.evaluate.data import TaskData
from melp_scale.evaluate.metrics import evaluate_auc, macro_auc

PRESETS = {"ours": {"batch_size": 16, "patience": 10},
           "official": {"batch_size": 128, "patience": 5}}


@dataclasses.dataclass
class ProbeConfig:
    """Linear-probe training settings (after the MELP paper's protocol)."""

    fractions: tuple[float, ...] = (0.01, 0.1, 1.0)  # shares of the train split to train on
    lr: float = 1e-3  # AdamW learning rate
    weight_decay: float = 1e-4  # AdamW weight decay
    min_lr: float = 1e-5  # end of the cosine schedule
    epochs: int = 100  # most epochs
    patience: int = 10  # epochs without a better val macro AUC before stopping
    batch_size: int = 16  # rows per optimiser step (small: the 1 % subsets have few rows)
    seed: int = 0  # seeds the training subsets and the initialisation
    preset: str = "ours"  # name of the settings' origin, reported ("ours", "official", "custom")

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ProbeConfig":
        """``PRESETS[name]`` with ``overrides`` (None values ignored); custom if they differ."""
        if name not in PRESETS:
            raise ValueError(f"--probe-preset must be one of {', '.join(PRESETS)}, got {name!r}")
        settings = {**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}}
        changed = any(settings[k] != v for k, v in PRESETS[name].items())
        return cls(**settings, preset=f"{name} (modified)" if changed else name)

    def __post_init__(self) -> None:
        if not self.fractions or not all(0 < f <= 1 for f in self.fractions):
            raise ValueError(f"--fractions must be in (0, 1], got {self.fractions}")
        if self.epochs < 1 or self.patience < 1 or self.batch_size < 1:
            raise ValueError("--epochs, --patience and --probe-batch-size must be >= 1")
        if not 0 < self.min_lr <= self.lr:
            raise ValueError(f"--min-lr must be in (0, lr={self.lr}], got {self.min_lr}")


def train_subset(num_train: int, fraction: float, seed: int) -> np.ndarray:
    """Positions of the training subset: the first ceil(fraction * n) of a seeded permutation."""
    count = max(1, math.ceil(fraction * num_train))
    return np.sort(np.random.default_rng(seed).permutation(num_train)[:count])


def fit_probe(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
              config: ProbeConfig) -> tuple[nn.Linear, dict[str, Any]]:
    """Train one linear layer (on standardised inputs) with early stopping on val macro AUC.

    Returns the best layer (standardisation folded in: it takes raw features) and a log.
    Runs on one thread: the matrices are tiny, and worker threads only add synchronisation
    (on a busy 2-core machine, 20x slower).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _fit(train_x, train_y, val_x, val_y, config)
    finally:
        torch.set_num_threads(threads)


def _fit(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
         config: ProbeConfig) -> tuple[nn.Linear, dict[str, Any]]:
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    mean, std = train_x.mean(axis=0), train_x.std(axis=0) + 1e-6
    x = torch.from_numpy((train_x - mean) / std).float()
    y = torch.from_numpy(train_y).float()
    vx = torch.from_numpy((val_x - mean) / std).float()
    layer = nn.Linear(x.shape[1], y.shape[1])
    optimizer = torch.optim.AdamW(layer.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(x) / config.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=config.epochs * steps_per_epoch, eta_min=config.min_lr)
    loss_fn = nn.BCEWithLogitsLoss()
    best_auc, best_state, best_epoch, stale = -math.inf, None, 0, 0
    for epoch in range(1, config.epochs + 1):
        for batch in torch.randperm(len(x), generator=generator).split(config.batch_size):
            optimizer.zero_grad(set_to_none=True)
            loss_fn(layer(x[batch]), y[batch]).backward()
            optimizer.step()
            schedule.step()
        with torch.no_grad():
            val_auc = macro_auc(val_y, torch.sigmoid(layer(vx)).numpy()) if len(vx) else math.nan
        if math.isnan(val_auc):
            best_state, best_epoch = {k: v.clone() for k, v in layer.state_dict().items()}, epoch
            continue
        if val_auc > best_auc:
            best_auc, best_epoch, stale = val_auc, epoch, 0
            best_state = {k: v.clone() for k, v in layer.state_dict().items()}
        else:
            stale += 1
            if stale >= config.patience:
                break
    layer.load_state_dict(best_state)
    with torch.no_grad():  # fold the standardisation in: W' = W / std, b' = b - W' mean
        scale = torch.from_numpy(1.0 / std).float()
        layer.weight.mul_(scale)
        layer.bias.sub_(layer.weight @ torch.from_numpy(mean).float())
    log = {"best_epoch": best_epoch, "epochs_run": epoch,
           "val_macro_auc": None if best_auc == -math.inf else round(best_auc * 100, 4)}
    return layer, log


def run_linear_probe(data: TaskData, features: np.ndarray, config: ProbeConfig,
                     num_bootstrap: int = 1000, auc_scores: str = "sigmoid"
                     ) -> tuple[dict[str, Any], dict]:
    """Linear probe of ``data`` for each training fraction; ``features`` (N_all, E) indexed by
    ``data.rows``. Returns (result JSON, curves of the largest fraction)."""
    split_x = {s: features[data.rows[data.split_rows(s)]].astype(np.float32)
               for s in ("train", "val", "test")}
    split_y = {s: data.labels[data.split_rows(s)] for s in ("train", "val", "test")}
    if len(split_x["train"]) == 0 or len(split_x["test"]) == 0:
        raise ValueError(f"task {data.task.name}: the linear probe needs train and test rows "
                         f"(sizes {[len(v) for v in split_x.values()]}); check --split-csv")
    results, curves = {}, {}
    for fraction in config.fractions:
        subset = train_subset(len(split_x["train"]), fraction, config.seed)
        layer, log = fit_probe(split_x["train"][subset], split_y["train"][subset],
                               split_x["val"], split_y["val"], config)
        with torch.no_grad():
            logits = layer(torch.from_numpy(split_x["test"]))
            scores = (torch.softmax(logits, dim=1) if auc_scores == "softmax"
                      else torch.sigmoid(logits)).numpy()
        auc = evaluate_auc(split_y["test"], scores, data.task.class_names, num_bootstrap, config.seed)
        results[f"{fraction:g}"] = {"num_train": int(len(subset)), **log, **auc.to_dict()}
        curves = {"labels": split_y["test"], "scores": scores, "classes": data.task.class_names}
    sizes = {s: int(len(v)) for s, v in split_x.items()}
    return {"kind": "linear_probe", "task": data.task.name, "split_rule": data.split_rule,
            "split_sizes": sizes, "left_out": data.left_out,
            "auc_scores": "softmax over classes (compatibility)" if auc_scores == "softmax" else "sigmoid",
            "settings": dataclasses.asdict(config), "fractions": results}, curves
