"""The one-screen end-of-run summary."""
from __future__ import annotations

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
    lines.append(f"skipped non-finite steps: {summary['skipped_steps']}, "
                 f"bad samples: {summary['bad_samples']}")
    lines.append(f"checkpoint: {summary['checkpoint']}")
    if summary.get("export"):
        lines.append(f"export ({summary.get('export_format') or 'model'}): {summary['export']}")
    print("\n".join(lines), flush=True)
