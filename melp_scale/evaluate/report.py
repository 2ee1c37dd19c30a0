"""Evaluation outputs: results JSON, Markdown tables in the paper's layout, ROC curves (PNG).

The paper's tables have one row per method (zero-shot) or per method and training fraction
(linear probe: "1 %", "10 %", "100 %") and one column per downstream task, macro ROC-AUC × 100.
Here the rows are this checkpoint's, each cell ``AUC [95 % CI]``; per-task tables add one row
per class with its positives, and name the classes absent from the test split.
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from melp_scale.evaluate.metrics import roc_curve
from melp_scale.evaluate.tasks import TASKS


def write_json(path: str, payload: dict[str, Any]) -> None:
    """Write ``payload`` as indented JSON, atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=1, default=_plain)
        handle.write("\n")
    os.replace(tmp, path)


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def _cell(auc: dict[str, Any] | None) -> str:
    if not auc or auc.get("macro_auc") is None:
        return "n/a"
    ci = auc.get("macro_auc_ci95")
    return f"{auc['macro_auc']:.2f} [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else f"{auc['macro_auc']:.2f}"


def _title(task: str) -> str:
    return TASKS[task].title if task in TASKS else task


def auc_table(zeroshot: dict[str, dict], probes: dict[str, dict], label: str = "this checkpoint"
              ) -> str:
    """The paper's layout: columns = tasks, rows = zero-shot and linear probe per fraction."""
    tasks = list(dict.fromkeys([*zeroshot, *probes]))
    if not tasks:
        return ""
    lines = ["| method | " + " | ".join(_title(t) for t in tasks) + " | mean |",
             "|---|" + "---|" * (len(tasks) + 1)]
    rows: list[tuple[str, list[dict | None]]] = []
    if zeroshot:
        rows.append((f"{label}, zero-shot", [zeroshot.get(t) for t in tasks]))
    fractions = list(dict.fromkeys(f for p in probes.values() for f in p["fractions"]))
    for fraction in fractions:
        cells = [probes[t]["fractions"].get(fraction) if t in probes else None for t in tasks]
        rows.append((f"{label}, linear probe {float(fraction) * 100:g} %", cells))
    for name, cells in rows:
        values = [c["macro_auc"] for c in cells if c and c.get("macro_auc") is not None]
        mean = f"{np.mean(values):.2f}" if values else "n/a"
        lines.append(f"| {name} | " + " | ".join(_cell(c) for c in cells) + f" | {mean} |")
    return "\n".join(lines) + "\n"


def per_class_table(result: dict[str, Any]) -> str:
    """One task's per-class AUC × 100 with CIs and positives; absent classes named."""
    lines = ["| class | AUC | 95 % CI | positives |", "|---|---|---|---|"]
    for name, entry in result["per_class"].items():
        auc = "absent" if entry["auc"] is None else f"{entry['auc']:.2f}"
        ci = f"[{entry['ci95'][0]:.1f}, {entry['ci95'][1]:.1f}]" if entry["ci95"] else "-"
        lines.append(f"| {name} | {auc} | {ci} | {entry['positives']} |")
    absent = result.get("absent_classes") or []
    note = (f"\nAbsent from the scored rows (no positive or no negative; not in the macro "
            f"average): {', '.join(absent)}.\n") if absent else ""
    return "\n".join(lines) + "\n" + note


def retrieval_table(result: dict[str, Any]) -> str:
    """Recall@k × 100 of both directions."""
    ks = sorted({int(k.split("@")[1]) for k in result if "_r@" in k})
    lines = ["| direction | " + " | ".join(f"R@{k}" for k in ks) + " |",
             "|---|" + "---|" * len(ks)]
    for direction, label in (("ecg2text", "ECG → report"), ("text2ecg", "report → ECG")):
        lines.append(f"| {label} | " + " | ".join(f"{result[f'{direction}_r@{k}']:.2f}" for k in ks) + " |")
    return "\n".join(lines) + "\n"


def caption_table(result: dict[str, Any]) -> str:
    """BLEU-4, ROUGE-L and statement F1 × 100."""
    return ("| BLEU-4 | ROUGE-L | statement F1 (micro) | statement F1 (macro) |\n|---|---|---|---|\n"
            f"| {result['bleu4']:.2f} | {result['rougeL']:.2f} | {result['statement_f1_micro']:.2f} "
            f"| {result['statement_f1_macro']:.2f} |\n")


def summary_markdown(results: dict[str, Any], label: str = "this checkpoint") -> str:
    """One document: the AUC table, then retrieval and caption when present."""
    parts = []
    table = auc_table(results.get("zeroshot", {}), results.get("linear_probe", {}), label)
    if table:
        parts.append("## Classification (macro ROC-AUC × 100, bootstrap 95 % CI)\n\n" + table)
    if "retrieval" in results:
        r = results["retrieval"]
        parts.append(f"## Retrieval ({r['num_pairs']} pairs, split {r['split']})\n\n" + retrieval_table(r))
    if "caption" in results:
        c = results["caption"]
        parts.append(f"## Report generation ({c['num_reports']} reports, split {c['split']})\n\n"
                     + caption_table(c))
    return "\n".join(parts)


def plot_roc(curves: dict[str, Any], path: str, title: str) -> None:
    """ROC curve of every class with positives and negatives in ``curves`` (labels, scores)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from melp_scale.evaluate.metrics import roc_auc

    labels, scores = np.asarray(curves["labels"]).astype(bool), np.asarray(curves["scores"])
    aucs = roc_auc(labels, scores)
    figure, axis = plt.subplots(figsize=(6, 6))
    for column, name in enumerate(curves["classes"]):
        if np.isfinite(aucs[column]):
            fpr, tpr = roc_curve(labels[:, column], scores[:, column])
            axis.plot(fpr, tpr, lw=1.2, label=f"{name} ({aucs[column] * 100:.1f})")
    axis.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    axis.set(xlabel="false positive rate", ylabel="true positive rate", title=title,
             xlim=(0, 1), ylim=(0, 1.01))
    if np.isfinite(aucs).any():
        axis.legend(fontsize=6 if len(curves["classes"]) > 12 else 8, loc="lower right")
    else:
        axis.text(0.5, 0.5, "no class with positives and negatives", ha="center")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
