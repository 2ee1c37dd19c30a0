"""Summarise one ``benchmarks/gpu_check.sh`` run folder into summary.json and summary.png.

    python benchmarks/gpu_check_summary.py benchmarks/results/gpu_check-<stamp>

Reads what the stages left in the folder: stages.tsv (status and seconds per stage),
notes.txt, tests.xml (pytest's junit XML), the loss-kernel benchmark JSON (kernels_full/, else
kernels_quick/) and the train-step JSON (train_step/). Writes summary.json (environment, stage
table, test counts and failures, Triton-vs-eager speed-ups per op and size, train-step times)
and summary.png (the same as three panels). Missing pieces are reported, never fatal.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def read_stages(folder: Path) -> list[dict[str, Any]]:
    path = folder / "stages.tsv"
    if not path.exists():
        return []
    lines = path.read_text().splitlines()[1:]
    rows = []
    for line in lines:
        name, status, seconds, command = (line.split("\t") + ["", "", "", ""])[:4]
        rows.append({"stage": name, "status": status, "seconds": int(seconds or 0), "command": command})
    return rows


def read_tests(folder: Path) -> dict[str, Any] | None:
    path = folder / "tests.xml"
    if not path.exists():
        return None
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    failed = []
    for case in root.iter("testcase"):
        problem = case.find("failure") if case.find("failure") is not None else case.find("error")
        if problem is not None:
            message = (problem.get("message") or "").splitlines()[:1]
            failed.append(f"{case.get('classname')}::{case.get('name')}: {message[0][:300] if message else ''}")
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "failed": failed}


def _latest_json(folder: Path) -> dict[str, Any] | None:
    files = sorted(folder.glob("*.json")) if folder.is_dir() else []
    return json.loads(files[-1].read_text()) if files else None


def read_kernels(folder: Path) -> tuple[str | None, dict[str, Any] | None]:
    for name in ("kernels_full", "kernels_quick"):
        data = _latest_json(folder / name)
        if data is not None:
            return name, data
    return None, None


def kernel_speedups(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Per (op, size): forward+backward median ms of each implementation, Triton's speed-up over eager."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for result in data.get("results", []):
        if result.get("mode") != "forward+backward":
            continue
        row = rows.setdefault((result["op"], result["label"]), {"op": result["op"], "size": result["label"],
                                                                  "median_ms": {}, "errors": {}})
        if result.get("median_ms") is not None:
            row["median_ms"][result["variant"]] = result["median_ms"]
        if result.get("error"):
            row["errors"][result["variant"]] = str(result["error"])[:200]
    for row in rows.values():
        triton, eager = row["median_ms"].get("triton"), row["median_ms"].get("eager")
        row["triton_vs_eager"] = eager / triton if triton and eager else None
        compiled = row["median_ms"].get("eager+compile")
        row["triton_vs_compile"] = compiled / triton if triton and compiled else None
    return list(rows.values())


def environment() -> dict[str, Any]:
    try:
        import torch

        from benchmarks.harness import environment as harness_environment

        return harness_environment(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    except Exception as exc:  # noqa: BLE001 -- the summary must still be written
        return {"error": f"{type(exc).__name__}: {exc}"}


def plot(summary: dict[str, Any], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"no PNG: matplotlib is not importable ({exc})"
    fig, axes = plt.subplots(1, 3, figsize=(18, 5))
    stages = summary["stages"]
    colours = ["tab:green" if s["status"] == "passed" else "tab:grey" if s["status"] == "skipped" else "tab:red"
               for s in stages]
    axes[0].barh([s["stage"] for s in stages], [s["seconds"] for s in stages], color=colours)
    tests = summary.get("tests") or {}
    axes[0].set_title(f"stages (s); tests {tests.get('passed', '?')} passed, "
                      f"{tests.get('failures', 0) + tests.get('errors', 0) if tests else '?'} failed")
    rows = [r for r in summary["kernels"] if r["triton_vs_eager"]]
    axes[1].barh([f"{r['op']} {r['size']}" for r in rows], [r["triton_vs_eager"] for r in rows], color="tab:blue")
    axes[1].axvline(1.0, color="black", linewidth=0.8)
    axes[1].set_xscale("log")
    axes[1].set_title(f"Triton speed-up over eager, fwd+bwd ({summary.get('kernels_source') or 'no data'})")
    axes[1].tick_params(axis="y", labelsize=7)
    steps = summary["train_step"]
    axes[2].bar([f"{r['preset']}\n{r['impl']}" for r in steps], [r["median_s"] for r in steps], color="tab:orange")
    axes[2].set_title("train step, median s (50 steps, paper config)" if steps else "train step: not run")
    env = summary["environment"]
    fig.suptitle(f"gpu_check · {env.get('device', '?')} · torch {env.get('torch', '?')} · "
                 f"triton {env.get('triton', '?')} · git {str(env.get('git_revision', '?'))[:12]}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__.split("\n\n")[1])
        return 2
    folder = Path(args[0])
    notes = (folder / "notes.txt").read_text().splitlines() if (folder / "notes.txt").exists() else []
    source, kernel_data = read_kernels(folder)
    train = _latest_json(folder / "train_step")
    summary = {
        "environment": environment(),
        "gpu": (folder / "nvidia-smi.txt").read_text().strip() if (folder / "nvidia-smi.txt").exists() else None,
        "stages": read_stages(folder),
        "notes": notes,
        "tests": read_tests(folder),
        "kernels_source": source,
        "kernels": kernel_speedups(kernel_data) if kernel_data else [],
        "train_step": train.get("rows", []) if train else [],
    }
    problem = plot(summary, folder / "summary.png")
    if problem:
        summary["notes"].append(problem)
    (folder / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"gpu_check summary ({folder}):")
    for stage in summary["stages"]:
        print(f"  {stage['stage']:<14} {stage['status']:<14} {stage['seconds']:>5} s")
    if summary["tests"]:
        t = summary["tests"]
        print(f"  tests: {t['passed']} passed, {t['failures']} failed, {t['errors']} errors, {t['skipped']} skipped")
        for line in t["failed"][:10]:
            print(f"    FAILED {line}")
    for row in summary["kernels"]:
        speedup = f"{row['triton_vs_eager']:.2f}x" if row["triton_vs_eager"] else "-"
        print(f"  {row['op']:<15} {row['size']:<22} triton vs eager {speedup}")
    for row in summary["train_step"]:
        print(f"  train_step {row['preset']} {row['impl']:<10} {row['median_s']:.3f} s/step "
              f"({row.get('samples_per_s', 0):.1f} samples/s)")
    for line in summary["notes"]:
        print(f"  note: {line}")
    print(f"wrote {folder / 'summary.json'} and {folder / 'summary.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
