"""Zero-shot classification, as the MELP paper evaluates it (README, "Evaluation").

Each class of a task has one clinically accurate description, written for this project and
kept in ``prompts/<task>.json`` (reviewed per class; nothing is copied from the reference's
prompt files): the default, named ``melp-scale`` in the results. ``--prompts FILE.json``
replaces them with a user's prompt file in the common layout ``{class name: prompt or
[prompts]}`` (one flat object may cover several tasks; class names are matched ignoring
case, whitespace, underscores and hyphens, aliases included; a class with no prompt is an
error naming it). Several prompts of one class are averaged in embedding space: each
prompt's L2-normalised text embedding, their mean, renormalised. A sample's score for a
class is the cosine of its L2-normalised ECG global embedding and the class embedding.
Scores are computed on the task's ``test`` split (``split="all"`` scores every sample, for
sets too small to split); per-class and macro ROC-AUC × 100 with bootstrap 95 % CIs, classes
absent from the scored rows reported by name (metrics.py).
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch

from melp_scale.evaluate.data import TaskData
from melp_scale.evaluate.metrics import evaluate_auc
from melp_scale.evaluate.tasks import Task, normalise_name


def load_prompts(task: Task, path: str | None = None) -> tuple[str, list[list[str]]]:
    """``(source name, prompts per class in class order)``: ours, or the user's ``path``."""
    if path is None:
        return f"melp-scale ({os.path.basename(task.prompt_file)})", [[p] for p in task.prompts()]
    try:
        with open(path, encoding="utf-8") as handle:
            table = json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"--prompts {path!r}: cannot read a JSON object ({error})") from error
    if isinstance(table, dict) and isinstance(table.get("classes"), dict):
        table = table["classes"]  # our own layout: {"task": ..., "classes": {...}}
    if not isinstance(table, dict):
        raise ValueError(f"--prompts {path!r}: expected {{class name: prompt or [prompts]}}")
    by_name: dict[str, list[str]] = {}
    for key in table:
        by_name.setdefault(normalise_name(key), []).append(key)
    out, missing = [], []
    for cls in task.classes:
        keys = list(dict.fromkeys(k for n in dict.fromkeys(normalise_name(a) for a in
                                                             (cls.name, *cls.aliases))
                                  for k in by_name.get(n, [])))
        if len(keys) > 1:
            raise ValueError(f"--prompts {path!r}: class {cls.name} of task {task.name} matches "
                             f"several entries {keys}")
        if not keys:
            missing.append(cls.name)
            continue
        value = table[keys[0]]
        prompts = [value] if isinstance(value, str) else value
        if (not isinstance(prompts, list) or not prompts
                or not all(isinstance(p, str) and p.strip() for p in prompts)):
            raise ValueError(f"--prompts {path!r}: entry {keys[0]!r} must be a non-empty string "
                             "or a non-empty list of non-empty strings")
        out.append([p.strip() for p in prompts])
    if missing:
        raise ValueError(f"--prompts {path!r}: no prompt for class(es) {', '.join(missing)} of "
                         f"task {task.name}")
    return f"user file {os.path.basename(path)}", out


@torch.no_grad()
def class_embeddings(model, prompts: list[list[str]] | list[str], batch_size: int = 64) -> np.ndarray:
    """(C, E) class embeddings: per class, the mean of its prompts' L2-normalised text
    embeddings, renormalised (a single prompt: its own embedding)."""
    model.eval()
    groups = [[p] if isinstance(p, str) else list(p) for p in prompts]
    flat = [p for group in groups for p in group]
    chunks = [model.encode_text(flat[i:i + batch_size]).float().cpu()
              for i in range(0, len(flat), batch_size)]
    embeddings = torch.nn.functional.normalize(torch.cat(chunks).double(), dim=-1)
    out, start = [], 0
    for group in groups:
        out.append(embeddings[start:start + len(group)].mean(dim=0))
        start += len(group)
    return torch.nn.functional.normalize(torch.stack(out), dim=-1).numpy()


def zeroshot_scores(ecg_global: np.ndarray, text: np.ndarray) -> np.ndarray:
    """(N, C) cosine similarities of L2-normalised ECG (N, E) and class (C, E) embeddings."""
    return ecg_global.astype(np.float64) @ text.astype(np.float64).T


def softmax_scores(scores: np.ndarray) -> np.ndarray:
    """Softmax over the class axis (the compatibility scoring of some published code: it
    makes classes compete, which is wrong for multi-label tasks)."""
    shifted = scores - scores.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def run_zeroshot(model, data: TaskData, ecg_global: np.ndarray, split: str = "test",
                 num_bootstrap: int = 1000, seed: int = 0, prompts_file: str | None = None,
                 auc_scores: str = "sigmoid") -> tuple[dict[str, Any], dict]:
    """Zero-shot AUC of ``data`` on ``split`` (or "all"); ``ecg_global`` (N_all, E) indexed by
    ``data.rows``. ``auc_scores="softmax"`` ranks a softmax over classes of the cosines
    (compatibility only); the default ranks each class's cosine on its own (monotone in the
    sigmoid of it). Returns ``(result JSON, curves)``."""
    prompt_source, prompts = load_prompts(data.task, prompts_file)
    positions = np.arange(len(data.rows)) if split == "all" else data.split_rows(split)
    if positions.size == 0:
        raise ValueError(f"task {data.task.name}: the {split!r} split is empty "
                         "(--split all scores every sample)")
    scores = zeroshot_scores(ecg_global[data.rows[positions]], class_embeddings(model, prompts))
    if auc_scores == "softmax":
        scores = softmax_scores(scores)
    labels = data.labels[positions]
    auc = evaluate_auc(labels, scores, data.task.class_names, num_bootstrap, seed)
    result = {"kind": "zeroshot", "task": data.task.name, "split": split,
              "split_rule": data.split_rule, "left_out": data.left_out,
              "auc_scores": "softmax over classes (compatibility)" if auc_scores == "softmax"
              else "per-class cosine (sigmoid-equivalent)",
              "prompt_set": prompt_source,
              "prompts": {c: p if len(p) > 1 else p[0] for c, p in zip(data.task.class_names, prompts)},
              **auc.to_dict()}
    return result, {"labels": labels, "scores": scores, "classes": data.task.class_names}
