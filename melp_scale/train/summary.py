"""The one-screen end-of-run summary."""
from __future__ import annotations

from typing import Any


def print_summary(summary: dict[str, Any]) -> None:
    val = summary.get("validation") or {}
    lines = [
        "",
        f"== pretraining {summary['status']}: step {summary['step']}/{summary['total_steps']}, "
        f"epoch {summary['epoch']}, {summary['seconds']:.0f} s on {summary['world_size']} rank(s), "
        f"{summary['precision']} ==",
    ]
    if val:
        lines.append("validation: " + ", ".join(
            f"{k[4:]} {v:.3f}" for k, v in val.items()
            if k.startswith("val_") and isinstance(v, float)))
    lines.append(f"skipped non-finite steps: {summary['skipped_steps']}, "
                 f"bad samples: {summary['bad_samples']}")
    lines.append(f"checkpoint: {summary['checkpoint']}")
    if summary.get("export"):
        lines.append(f"export (MELP.from_pretrained): {summary['export']}")
    print("\n".join(lines), flush=True)
