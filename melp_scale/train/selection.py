"""Checkpoint selection during pretraining: score, keep the best model, stop when it stalls.

Every ``run.select_every`` steps (and at the last step) the Trainer asks its task for a score
(higher is better); MELP's is the zero-shot macro ROC-AUC x 100 on the downstream sets of the
preset's ``select.sets``, averaged over the sets (the reference recipe
early-stops on validation zero-shot AUC). Rank 0 scores (every rank holds the whole model
under ZeRO-2) and broadcasts the score, or its error, so every rank takes the same decision
and no collective is left waiting. A better score than every earlier one writes the model to
``RUN/export-best/`` (the task's export plus ``selection.json``: step and score);
``run.select_patience`` scores in a row without improvement stop the run early.

:class:`ZeroShotSelection` adapts the evaluation library (``melp_scale.evaluate``: the task
registry, shard indexing, features and ``run_zeroshot``) to a model in training: each set's
split rows are indexed once, their ECG features recomputed at every score.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from melp_scale.train.config import SelectConfig

log = logging.getLogger("melp_scale.train")
BEST = "export-best"
METRIC = "zero-shot macro AUC x 100 (mean over select.sets)"


class ZeroShotSelection:
    """Zero-shot macro AUC x 100 of a MELP model on ``select.sets`` (see the module docstring)."""

    def __init__(self, config: SelectConfig):
        from melp_scale.evaluate.tasks import get_task

        if not config.sets:
            raise ValueError("run.select_every is set but select.sets is empty: name the downstream "
                             "sets, e.g. select.sets=[{shards: shards/ptbxl, task: ptbxl-super}]")
        self.config = config
        self.sets = []
        for index, item in enumerate(config.sets):
            shards = str(item["shards"])
            if not os.path.isfile(os.path.join(shards, "manifest.json")):
                raise ValueError(f"select.sets[{index}].shards {shards!r} has no manifest.json; build "
                                 f"it with `python -m melp_scale.shard build ... --out {shards}`")
            try:
                task = get_task(str(item["task"]))
            except ValueError as error:
                raise ValueError(f"select.sets[{index}].task: {error}") from None
            self.sets.append((shards, task))
        self._indexed: list[tuple[list, Any, list[tuple[str, Any]]]] | None = None

    def _index(self) -> list[tuple[list, Any, list[tuple[str, Any]]]]:
        """Per shard set: (the refs of the samples any of its tasks scores, DataConfig,
        [(name, TaskData with rows into those refs)]); a set's ECGs are encoded once."""
        from melp_scale.evaluate.data import (
            DataConfig,
            TaskData,
            index_shards,
            task_data,
        )

        groups: dict[str, dict[str, Any]] = {}
        for shards, task in self.sets:
            if shards not in groups:
                config = DataConfig(data=shards, batch_size=self.config.batch_size,
                                    seed=self.config.seed)
                groups[shards] = {"refs": index_shards(shards)[0], "config": config, "tasks": []}
            group = groups[shards]
            data = task_data(task, group["refs"], group["config"])
            positions = (np.arange(len(data.rows)) if self.config.split == "all"
                         else data.split_rows(self.config.split))
            if positions.size == 0:
                raise ValueError(f"select.sets: task {task.name} on {shards!r} has no "
                                 f"{self.config.split!r} samples (select.split=all scores every sample)")
            group["tasks"].append((task, data, positions))
        indexed = []
        for shards, group in groups.items():
            needed = np.unique(np.concatenate([d.rows[p] for _, d, p in group["tasks"]]))
            subsets = []
            for task, data, positions in group["tasks"]:
                rows = np.searchsorted(needed, data.rows[positions])
                subsets.append((f"{task.name}@{os.path.basename(os.path.normpath(shards))}",
                                TaskData(task, rows, data.labels[positions], data.splits[positions],
                                         data.split_rule, data.left_out)))
                log.info("selection set %s: %d %s samples", subsets[-1][0], rows.size,
                         self.config.split)
            indexed.append(([group["refs"][i] for i in needed], group["config"], subsets))
        return indexed

    @torch.no_grad()
    def score(self, model: torch.nn.Module) -> tuple[float, dict[str, float]]:
        """(mean macro AUC x 100 over the sets, {"select_auc/<task>@<set>": AUC x 100});
        ``nan`` for a set where no class has both positives and negatives."""
        from melp_scale.evaluate.data import extract_features
        from melp_scale.evaluate.zeroshot import run_zeroshot

        if self._indexed is None:
            self._indexed = self._index()
        details = {}
        with _autocast_like(model):
            for refs, data_config, subsets in self._indexed:
                features = extract_features(model, refs, data_config, cache_dir=None)
                for name, data in subsets:
                    result, _ = run_zeroshot(model, data, features["global"], split="all",
                                             num_bootstrap=0)
                    auc = result["macro_auc"]
                    details[f"select_auc/{name}"] = float("nan") if auc is None else float(auc)
        finite = [v for v in details.values() if math.isfinite(v)]
        return (sum(finite) / len(finite) if finite else float("nan")), details


def _autocast_like(model: torch.nn.Module):
    """Autocast to the model's dtype when DeepSpeed holds it in bf16/fp16 (the evaluation
    feeds fp32 ECGs); nothing in fp32."""
    parameter = next(model.parameters())
    if parameter.dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(parameter.device.type, dtype=parameter.dtype)
    return contextlib.nullcontext()


def broadcast_score(rank: int, compute) -> tuple[float, dict[str, float]]:
    """``compute()`` on rank 0, its (score, details) on every rank; an exception on rank 0 is
    sent too and re-raised everywhere (as ValueError when it was one), so no rank hangs."""
    payload: list[Any] = [None]
    if rank == 0:
        try:
            payload = [("ok", *compute())]
        except Exception as error:  # noqa: BLE001 - forwarded to every rank below
            payload = [("error", type(error).__name__, str(error))]
    dist.broadcast_object_list(payload, src=0)
    outcome = payload[0]
    if outcome[0] == "error":
        kind = ValueError if outcome[1] == "ValueError" else RuntimeError
        raise kind(f"checkpoint selection failed on rank 0: {outcome[1]}: {outcome[2]}")
    return outcome[1], outcome[2]


def write_best(export, model: torch.nn.Module, out: str, record: dict[str, Any]) -> str:
    """Write the model through ``export(model, path)`` to ``out/export-best`` with
    ``selection.json``; the previous best is replaced only once the new one is complete."""
    final = os.path.join(out, BEST)
    staging, previous = f"{final}.tmp", f"{final}.old"
    for path in (staging, previous):
        shutil.rmtree(path, ignore_errors=True)
    export(model, staging)
    with open(os.path.join(staging, "selection.json"), "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=1)
    if os.path.isdir(final):
        os.replace(final, previous)
    os.replace(staging, final)
    shutil.rmtree(previous, ignore_errors=True)
    return final


def update_best(state, step: int, score: float) -> bool:
    """Record ``score`` of ``step`` in the run state (best_score, best_step, since_best,
    select_scores); True when it beats every earlier score."""
    state.select_scores.append([step, score])
    improved = math.isfinite(score) and (state.best_score is None or score > state.best_score)
    if improved:
        state.best_score, state.best_step, state.since_best = score, step, 0
    else:
        state.since_best += 1
    return improved


def selection_summary(state, out: str, select_every: int) -> dict[str, Any] | None:
    """The summary's ``selection`` entry (None when selection is off)."""
    if not select_every:
        return None
    best = os.path.join(out, BEST)
    return {"metric": METRIC, "every": select_every, "best_score": state.best_score,
            "best_step": state.best_step, "export_best": best if os.path.isdir(best) else None,
            "scores": state.select_scores}
