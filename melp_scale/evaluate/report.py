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


def auc_table(zeroshot: dict[str, dict], probes: dict[str, dict], label: str = "this checkpoint",
              finetune: dict[str, dict] | None = None) -> str:
    """The paper's layout: columns = tasks, rows = zero-shot, then linear probe and
    fine-tuning per training fraction."""
    finetune = finetune or {}
    tasks = list(dict.fromkeys([*zeroshot, *probes, *finetune]))
    if not tasks:
        return ""
    lines = ["| method | " + " | ".join(_title(t) for t in tasks) + " | mean |",
             "|---|" + "---|" * (len(tasks) + 1)]
    rows: list[tuple[str, list[dict | None]]] = []
    if zeroshot:
        rows.append((f"{label}, zero-shot", [zeroshot.get(t) for t in tasks]))
    for name, table in (("linear probe", probes), ("fine-tuning", finetune)):
        fractions = list(dict.fromkeys(f for p in table.values() for f in p["fractions"]))
        for fraction in fractions:
            cells = [table[t]["fractions"].get(fraction) if t in table else None for t in tasks]
            rows.append((f"{label}, {name} {float(fraction) * 100:g} %", cells))
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
    table = auc_table(results.get("zeroshot", {}), results.get("linear_probe", {}), label,
                      results.get("finetune", {}))
    if table:
        parts.append("## Classification (macro ROC-AUC × 100, bootstrap 95 % CI)\n\n" + table)
    if "retrieval" in results:
        r = results["retrieval"]
        parts.append(f"## Retrieval ({r['num_pairs']} pairs, split {r['split']})\n\n" + retrieval_table(r))
    if "caption" in results:
        c = results["caption"]
        parts.append(f"## Report generation ({c['num_reports']} reports, split {c['split']})\n\n"
                     + caption_table(c))
    if "patient_id" in results:
        parts.append(patient_table(results["patient_id"]))
    return "\n".join(parts)


def patient_table(result: dict[str, Any]) -> str:
    """Top-k patient identification accuracy × 100 per feature kind, with chance."""
    ks = [k for k in result["chance"]]
    lines = [f"## Patient identification ({result['num_gallery']} gallery patients, "
             f"{result['num_probes']} probes; {result['split_rule']})\n",
             "| feature | " + " | ".join(ks) + " |", "|---|" + "---|" * len(ks)]
    for name in ("features", "global"):
        if name in result:
            lines.append(f"| {name} | " + " | ".join(f"{result[name][k]:.2f}" for k in ks) + " |")
    lines.append("| chance | " + " | ".join(f"{result['chance'][k]:.2f}" for k in ks) + " |")
    return "\n".join(lines) + "\n"


def protocol_markdown(results: dict[str, Any]) -> str:
    """The protocol switches the numbers depend on."""
    protocol = results.get("protocol")
    if not protocol:
        return ""
    return ("## Protocol\n\n"
            f"- input: `{protocol['name']}` ({protocol['input']})\n"
            f"- AUC scores: {protocol['auc_scores']}"
            + (" (compatibility option: classes compete)" if protocol["auc_scores"] == "softmax" else "")
            + f"\n- linear-probe preset: {protocol['probe_preset']}\n"
            f"- zero-shot prompts: {protocol['prompts']}\n")


def _seen(seen: dict[str, Any] | None) -> str:
    if not seen:
        return "-"
    flag = seen.get("seen_in_pretraining")
    if flag == "unknown":
        return f"{seen['num_subjects']} subjects, unknown (no training_data.json)"
    return (f"{seen['num_subjects']} subjects, {seen['subjects_trained_on']} trained on, "
            f"{seen['subjects_validated_on']} validated on"
            + (f" ({seen['record_partial']})" if seen.get("record_partial") else ""))


def data_markdown(results: dict[str, Any]) -> str:
    """Per evaluation: split rule, counts, and the scored subjects seen in pretraining."""
    pretraining = results.get("pretraining", {})
    lines = ["## Data, splits and pretraining overlap\n",
             f"Pretraining record: {pretraining.get('record', 'unknown')}"
             + (f"; pretraining shard sets: {', '.join(pretraining['pretraining_shard_sets'])}; "
                f"this shard set pretrained on: {pretraining['evaluated_shard_set_was_pretrained_on']}"
                if "pretraining_shard_sets" in pretraining else "")
             + ("; --allow-pretraining-rows was set" if pretraining.get("allow_pretraining_rows") else "")
             + "\n", "| evaluation | task | split rule | train / val / test | scored subjects (test) |",
             "|---|---|---|---|---|"]
    for kind in ("zeroshot", "linear_probe", "finetune"):
        for task, result in results.get(kind, {}).items():
            counts = result.get("split_counts", {})
            subjects = result.get("subjects", {})
            scored = subjects.get("test") if not (kind == "zeroshot" and result.get("split") == "all") else None
            lines.append(f"| {kind} | {task} | {result['split_rule']} | "
                         f"{counts.get('train', '-')} / {counts.get('val', '-')} / {counts.get('test', '-')} | "
                         f"{_seen(scored) if scored else 'all rows: ' + _all_seen(subjects)} |")
    for kind in ("retrieval", "caption", "patient_id"):
        if kind in results:
            lines.append(f"| {kind} | - | split {results[kind].get('split')} | - | "
                         f"{_seen(results[kind].get('subjects'))} |")
    return "\n".join(lines) + "\n"


def _all_seen(subjects: dict[str, dict]) -> str:
    return "; ".join(f"{split}: {_seen(seen)}" for split, seen in subjects.items())


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
