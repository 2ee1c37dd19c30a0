"""The one-screen end-of-run summary."""
from __future__ import annotations

import json
import os
from typing import Any

from melp_scale.train.engine import describe_batch


def _metrics(record: dict[str, Any]) -> str:
    return ", ".join(f"{k[4:]} {v:.3f}" for k, v in record.items()
                     if k.startswith("val_") and isinstance(v, float))


def print_summary(summary: dict[str, Any]) -> None:
    val, before = summary.get("validation") or {}, summary.get("validation_before") or {}
    lines = [
        "",
        f"== {summary.get('task', 'pretraining')} {summary['status']}: step {summary['step']}/"
        f"{summary['total_steps']}, epoch {summary['epoch']}, {summary['seconds']:.0f} s on "
        f"{summary['world_size']} rank(s), {summary['precision']} ==",
    ]
    if before:
        lines.append(f"validation before training: {_metrics(before)}")
    if val:
        lines.append(f"validation{' at the end' if before else ''}: {_metrics(val)}")
    batch = summary.get("batch")
    if batch:
        lines.append(describe_batch(batch))
    chosen = summary.get("selection")
    if chosen:
        best = chosen["best_score"]
        lines.append(f"checkpoint selection ({chosen['metric']}, every {chosen['every']} steps): "
                     + (f"best {best:.2f} at step {chosen['best_step']} -> {chosen['export_best']}"
                        if best is not None else "no finite score"))
        lines += _selection_details(chosen.get("export_best"))
    speed = summary.get("throughput")
    if speed:  # model FLOPs utilisation against the device's dense bf16 peak (flops.py)
        mfu = (f"MFU {speed['mfu']:.1%} of {speed['device_peak']} ({speed['peak_tflops']:.0f} TFLOP/s "
               f"bf16 dense)" if speed.get("mfu") is not None else "MFU n/a (CPU or unlisted GPU)")
        lines.append(f"model throughput: {speed['tflops_per_s']:.3f} TFLOP/s per rank, {mfu}")
    lines.append(f"skipped non-finite steps: {summary['skipped_steps']}, "
                 f"bad samples: {summary['bad_samples']}")
    lines.append(f"checkpoint: {summary['checkpoint']}")
    if summary.get("export"):
        lines.append(f"export ({summary.get('export_format') or 'model'}): {summary['export']}")
    print("\n".join(lines), flush=True)


def _selection_details(export_best: str | None) -> list[str]:
    """The best step's zero-shot AUC per task (``selection.json`` of export-best/): what the
    demo prints for each factor of its held-out set."""
    path = os.path.join(export_best or "", "selection.json")
    if not export_best or not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as handle:
        record = json.load(handle)
    aucs = {k.split("/", 1)[1]: v for k, v in record.items() if k.startswith("select_auc/")}
    return [f"  zero-shot macro AUC x 100 at step {record.get('step')}: {name} {auc:.1f}"
            for name, auc in aucs.items()]
