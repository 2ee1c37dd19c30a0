"""Fine-tuning (the paper's transfer protocol): the whole ECG encoder with a linear head.

- Model: a fresh copy of the checkpoint per training fraction; the representation is
  ``MELP.ecg_features`` (ECG encoder + beat pooler, the linear-probe feature) and the head one
  ``nn.Linear(E, C)``; everything that feeds the feature is trained, the text tower and the
  decoder are not used.
- Training subset: the same seeded subsets as the linear probe (``train_subset``: 1 % of
  the rows is a subset of 10 %), val and test whole; inputs through the evaluation transform
  (no lead mask, centred crop, ``--protocol`` as for the other evaluations).
- Optimiser: AdamW with **layer-wise lr decay**: the head and the beat pooler get ``lr``,
  transformer layer ``i`` of ``L`` gets ``lr * decay ** (L - i)``, and the rest of the
  encoder (convolutional feature extractor, input projection, positional convolution)
  ``lr * decay ** (L + 1)``; cosine schedule per step to ``min_lr_ratio * lr``; BCE with
  logits (multi-label).
- Early stopping on the val macro AUC (sigmoid scores) after each epoch: the best weights
  are kept; training stops after ``patience`` epochs without improvement. Test: per-class
  and macro ROC-AUC with bootstrap CIs, the same result layout as the linear probe.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import re
import sys
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from melp_scale.evaluate.data import DataConfig, SampleRef, TaskData, iter_ecg_batches, make_transform
from melp_scale.evaluate.linear_probe import train_subset
from melp_scale.evaluate.metrics import evaluate_auc, macro_auc

log = logging.getLogger(__name__)


@dataclasses.dataclass
class FinetuneConfig:
    """Fine-tuning settings."""

    fractions: tuple[float, ...] = (0.01, 0.1, 1.0)  # shares of the train split to train on
    lr: float = 3e-4  # AdamW learning rate of the head and the top of the encoder
    layer_decay: float = 0.75  # lr factor per transformer layer going down the encoder
    weight_decay: float = 0.05  # AdamW weight decay
    min_lr_ratio: float = 0.01  # end of the cosine schedule, as a share of each group's lr
    epochs: int = 30  # most epochs
    patience: int = 5  # epochs without a better val macro AUC before stopping
    batch_size: int = 32  # ECGs per optimiser step
    seed: int = 0  # seeds the subsets, the head's initialisation and the batch order

    def __post_init__(self) -> None:
        if not self.fractions or not all(0 < f <= 1 for f in self.fractions):
            raise ValueError(f"--fractions must be in (0, 1], got {self.fractions}")
        if self.epochs < 1 or self.patience < 1 or self.batch_size < 1:
            raise ValueError("--ft-epochs, --ft-patience and --ft-batch-size must be >= 1")
        if not 0 < self.layer_decay <= 1:
            raise ValueError(f"--layer-decay must be in (0, 1], got {self.layer_decay}")
        if self.lr <= 0 or not 0 < self.min_lr_ratio <= 1:
            raise ValueError("--ft-lr must be > 0 and min_lr_ratio in (0, 1]")


class FinetuneModel(nn.Module):
    """``MELP.ecg_features`` followed by one linear layer."""

    def __init__(self, melp: nn.Module, num_classes: int, width: int):
        super().__init__()
        self.melp = melp
        self.head = nn.Linear(width, num_classes)

    def forward(self, ecg: torch.Tensor) -> torch.Tensor:
        return self.head(self.melp.ecg_features(ecg))


def parameter_groups(model: FinetuneModel, config: FinetuneConfig) -> list[dict[str, Any]]:
    """AdamW groups with layer-wise lr decay (module docstring); the parameters
    ``ecg_features`` does not use (text tower, decoder, caption pooler) are left out."""
    encoder, pooler = model.melp.ecg_encoder, model.melp.beat_pooler
    num_layers = len(getattr(encoder, "layers", []))
    groups: dict[int, list[nn.Parameter]] = {}
    for name, param in encoder.named_parameters():
        match = re.match(r"layers\.(\d+)\.", name)
        depth = int(match.group(1)) + 1 if match else 0
        groups.setdefault(depth, []).append(param)
    top = num_layers + 1
    groups.setdefault(top, []).extend([*pooler.parameters(), *model.head.parameters()])
    return [{"params": params, "lr": config.lr * config.layer_decay ** (top - depth),
             "depth": depth} for depth, params in sorted(groups.items())]


def _scores(model: FinetuneModel, refs: list[SampleRef], data_config: DataConfig,
            batch_size: int, device: torch.device) -> np.ndarray:
    model.eval()
    out = []
    with torch.no_grad():
        for _, ecg in iter_ecg_batches(refs, make_transform(data_config), batch_size):
            out.append(torch.sigmoid(model(ecg.to(device))).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, model.head.out_features))


def fit(make_model: Callable[[], nn.Module], refs: dict[str, list[SampleRef]],
        labels: dict[str, np.ndarray], data_config: DataConfig, config: FinetuneConfig,
        device: str = "cpu") -> tuple[FinetuneModel, dict[str, Any]]:
    """Fine-tune a fresh model on ``refs["train"]``; early stopping on ``refs["val"]``."""
    torch.manual_seed(config.seed)
    transform = make_transform(data_config)
    melp = make_model().to(device)
    with torch.no_grad():  # the feature width, from one training ECG
        _, first = next(iter_ecg_batches(refs["train"][:1], transform, 1))
        width = melp.eval().ecg_features(first.to(device)).shape[-1]
    model = FinetuneModel(melp, labels["train"].shape[1], width).to(device)
    groups = parameter_groups(model, config)
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(refs["train"]) / config.batch_size)
    total = config.epochs * steps_per_epoch
    base = [g["lr"] for g in optimizer.param_groups]
    loss_fn = nn.BCEWithLogitsLoss()
    target = torch.from_numpy(labels["train"]).float()
    rng = np.random.default_rng(config.seed)
    best_auc, best_state, best_epoch, stale, step = -math.inf, None, 0, 0, 0
    bar = tqdm(total=total, desc="finetune", unit="step", file=sys.stderr, leave=False)
    for epoch in range(1, config.epochs + 1):
        model.train()
        order = rng.permutation(len(refs["train"]))
        batches = iter_ecg_batches([refs["train"][i] for i in order], transform, config.batch_size)
        for positions, ecg in batches:
            scale = config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * step / total))
            for group, lr in zip(optimizer.param_groups, base):
                group["lr"] = lr * scale
            loss = loss_fn(model(ecg.to(device)), target[order[positions]].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            bar.update(1)
        val_auc = (macro_auc(labels["val"], _scores(model, refs["val"], data_config,
                                                    config.batch_size, device))
                   if len(refs["val"]) else math.nan)
        if math.isnan(val_auc) or val_auc > best_auc:
            best_auc = best_auc if math.isnan(val_auc) else val_auc
            best_epoch, stale = epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
            if stale >= config.patience:
                break
    bar.close()
    model.load_state_dict(best_state)
    return model, {"best_epoch": best_epoch, "epochs_run": epoch, "steps": step,
                   "val_macro_auc": None if best_auc == -math.inf else round(best_auc * 100, 4)}


def run_finetune(make_model: Callable[[], nn.Module], data: TaskData, refs: list[SampleRef],
                 data_config: DataConfig, config: FinetuneConfig, num_bootstrap: int = 1000,
                 device: str = "cpu") -> tuple[dict[str, Any], dict]:
    """Fine-tuning of ``data`` for each training fraction. Returns (result JSON, curves of
    the largest fraction), in the linear probe's layout."""
    split_refs = {s: [refs[i] for i in data.rows[data.split_rows(s)]] for s in ("train", "val", "test")}
    split_y = {s: data.labels[data.split_rows(s)] for s in ("train", "val", "test")}
    if not split_refs["train"] or not split_refs["test"]:
        raise ValueError(f"task {data.task.name}: fine-tuning needs train and test rows "
                         f"(sizes {[len(v) for v in split_refs.values()]}); check --split-csv")
    results, curves = {}, {}
    for fraction in config.fractions:
        subset = train_subset(len(split_refs["train"]), fraction, config.seed)
        model, fit_log = fit(make_model, {"train": [split_refs["train"][i] for i in subset],
                                          "val": split_refs["val"]},
                             {"train": split_y["train"][subset], "val": split_y["val"]},
                             data_config, config, device)
        scores = _scores(model, split_refs["test"], data_config, config.batch_size, torch.device(device))
        auc = evaluate_auc(split_y["test"], scores, data.task.class_names, num_bootstrap, config.seed)
        results[f"{fraction:g}"] = {"num_train": int(len(subset)), **fit_log, **auc.to_dict()}
        log.info("finetune %s %g %%: test macro AUC %s", data.task.name, fraction * 100,
                 results[f"{fraction:g}"]["macro_auc"])
        curves = {"labels": split_y["test"], "scores": scores, "classes": data.task.class_names}
        del model
    sizes = {s: len(v) for s, v in split_refs.items()}
    return {"kind": "finetune", "task": data.task.name, "split_rule": data.split_rule,
            "split_sizes": sizes, "left_out": data.left_out, "auc_scores": "sigmoid",
            "settings": dataclasses.asdict(config), "fractions": results}, curves
