"""Zero-shot classification (METHOD.md §5).

Each class of a task has one clinically accurate description, written for this project and
kept in ``prompts/<task>.json`` (reviewed per class; nothing is copied from the reference's
prompt files). The descriptions are text-encoded once; a sample's score for a class is the
cosine of its L2-normalised ECG global embedding and the class's L2-normalised text embedding.
Scores are computed on the task's ``test`` split (``split="all"`` scores every sample, for
sets too small to split); per-class and macro ROC-AUC × 100 with bootstrap 95 % CIs, classes
absent from the scored rows reported by name (metrics.py).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from melp_scale.evaluate.data import TaskData
from melp_scale.evaluate.metrics import evaluate_auc


@torch.no_grad()
def class_embeddings(model, prompts: list[str]) -> np.ndarray:
    """(C, E) L2-normalised text embeddings of the class descriptions."""
    model.eval()
    return model.encode_text(prompts).float().cpu().numpy()


def zeroshot_scores(ecg_global: np.ndarray, text: np.ndarray) -> np.ndarray:
    """(N, C) cosine similarities of L2-normalised ECG (N, E) and class (C, E) embeddings."""
    return ecg_global.astype(np.float64) @ text.astype(np.float64).T


def run_zeroshot(model, data: TaskData, ecg_global: np.ndarray, split: str = "test",
                 num_bootstrap: int = 1000, seed: int = 0) -> tuple[dict[str, Any], dict]:
    """Zero-shot AUC of ``data`` on ``split`` (or "all"); ``ecg_global`` (N_all, E) indexed by
    ``data.rows``. Returns ``(result JSON, curves)`` where curves holds labels and scores."""
    prompts = data.task.prompts()
    positions = np.arange(len(data.rows)) if split == "all" else data.split_rows(split)
    if positions.size == 0:
        raise ValueError(f"task {data.task.name}: the {split!r} split is empty "
                         "(--split all scores every sample)")
    scores = zeroshot_scores(ecg_global[data.rows[positions]], class_embeddings(model, prompts))
    labels = data.labels[positions]
    auc = evaluate_auc(labels, scores, data.task.class_names, num_bootstrap, seed)
    result = {"kind": "zeroshot", "task": data.task.name, "split": split,
              "split_rule": data.split_rule, "left_out": data.left_out,
              "prompts": dict(zip(data.task.class_names, prompts)), **auc.to_dict()}
    return result, {"labels": labels, "scores": scores, "classes": data.task.class_names}
