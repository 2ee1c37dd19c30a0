"""Runs the evaluations of one checkpoint on one shard set and writes every output.

Outputs under ``out``: ``results.json`` (everything, AUC × 100), ``results.md`` (the paper-style
table, then per-task class tables), ``roc/<kind>-<task>.png``, and ``cache/`` (features).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

from melp_scale.evaluate import report
from melp_scale.evaluate.caption import CaptionConfig, run_caption
from melp_scale.evaluate.data import DataConfig, extract_features, index_shards, task_data
from melp_scale.evaluate.linear_probe import ProbeConfig, run_linear_probe
from melp_scale.evaluate.retrieval import run_retrieval
from melp_scale.evaluate.tasks import Task, get_task, tasks_for_source
from melp_scale.evaluate.zeroshot import run_zeroshot

log = logging.getLogger(__name__)
KINDS = ("zeroshot", "linear-probe", "retrieval", "caption")


@dataclasses.dataclass
class RunConfig:
    """What to evaluate and where the outputs go."""

    checkpoint: str  # folder written by MELP.save_pretrained (runs/<name>/export)
    out: str  # output folder
    kinds: tuple[str, ...] = KINDS  # evaluations to run
    tasks: tuple[str, ...] = ()  # task names (empty: every task the shard set provides)
    zeroshot_split: str = "test"  # task split zero-shot scores ("test" or "all")
    retrieval_split: str = "val"  # shard-set split for retrieval ("train", "val", "all")
    num_bootstrap: int = 1000  # bootstrap replicates of the AUC CIs (0: none)
    device: str = "cpu"  # torch device of the model
    skip_unavailable: bool = False  # skip (and note) what the data cannot provide instead of failing

    def __post_init__(self) -> None:
        unknown = set(self.kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown evaluation(s) {sorted(unknown)}; choose from {', '.join(KINDS)}")
        if self.zeroshot_split not in ("train", "val", "test", "all"):
            raise ValueError(f"--zeroshot-split must be train, val, test or all, got {self.zeroshot_split!r}")
        if self.num_bootstrap < 0:
            raise ValueError(f"--bootstrap must be >= 0, got {self.num_bootstrap}")


def load_model(checkpoint: str, device: str):
    """``MELP.from_pretrained(checkpoint)`` in eval mode, with a clear error for a wrong folder."""
    from melp_scale.model import MELP

    if not os.path.isfile(os.path.join(checkpoint, "config.json")):
        raise ValueError(f"--checkpoint {checkpoint!r} has no config.json: pass the export folder "
                         "written by save_pretrained (runs/<name>/export)")
    return MELP.from_pretrained(checkpoint, map_location=device).eval()


def select_tasks(names: tuple[str, ...], refs) -> list[Task]:
    """The named tasks, or every task whose source the shard set has (and that has samples)."""
    if names:
        return [get_task(name) for name in names]
    sources = {str(r.meta.get("source")) for r in refs}
    return [task for source in sorted(sources) for task in tasks_for_source(source)]


def run(run_config: RunConfig, data_config: DataConfig, probe_config: ProbeConfig,
        caption_config: CaptionConfig) -> dict[str, Any]:
    """Every requested evaluation; writes the outputs and returns the results dict."""
    started = time.perf_counter()
    model = load_model(run_config.checkpoint, run_config.device)
    refs, settings = index_shards(data_config.data)
    signal = settings.get("signal", {})
    if (signal.get("fs"), settings.get("num_samples")) != (500, 5000):
        log.warning("%s was built at fs=%s with %s samples; MELP pretraining uses 500 Hz, 5000 "
                    "samples (rebuild with --fs 500 --seconds 10 to match)", data_config.data,
                    signal.get("fs"), settings.get("num_samples"))
    timings: dict[str, float] = {}
    tick = time.perf_counter()
    features = extract_features(model, refs, data_config, os.path.join(run_config.out, "cache"),
                                run_config.checkpoint)
    timings["features"] = round(time.perf_counter() - tick, 2)
    results: dict[str, Any] = {
        "checkpoint": os.path.abspath(run_config.checkpoint), "data": os.path.abspath(data_config.data),
        "preprocessing": {"normalize": data_config.normalize, "crop_samples": data_config.crop_samples,
                          "shard_settings": settings.get("signal", {}),
                          "leads": settings.get("leads")},
        "num_samples": len(refs), "timings_s": timings}
    classification = [k for k in run_config.kinds if k in ("zeroshot", "linear-probe")]
    tasks = select_tasks(run_config.tasks, refs) if classification else []
    for task in tasks:
        try:
            data = task_data(task, refs, data_config)
        except ValueError as error:
            if run_config.tasks:  # asked for by name: the user must hear why it cannot run
                raise
            log.info("skipping %s: %s", task.name, error)
            results.setdefault("skipped", {})[task.name] = str(error)
            continue
        for kind in classification:
            tick = time.perf_counter()
            if kind == "zeroshot":
                result, curves = run_zeroshot(model, data, features["global"], run_config.zeroshot_split,
                                              run_config.num_bootstrap, data_config.seed)
            else:
                result, curves = run_linear_probe(data, features["features"], probe_config,
                                                  run_config.num_bootstrap)
            key = kind.replace("-", "_")
            results.setdefault(key, {})[task.name] = result
            timings[f"{kind}/{task.name}"] = round(time.perf_counter() - tick, 2)
            report.plot_roc(curves, os.path.join(run_config.out, "roc", f"{kind}-{task.name}.png"),
                            f"{kind} {task.name}")
    text_kinds = [k for k in ("retrieval", "caption") if k in run_config.kinds]
    if text_kinds and run_config.skip_unavailable and not all(r.report.strip() for r in refs):
        results["skipped"] = {k: "the shard set has samples without reports" for k in text_kinds}
        text_kinds = []
    for kind in text_kinds:
        tick = time.perf_counter()
        if kind == "retrieval":
            results[kind] = run_retrieval(model, refs, features["global"], run_config.retrieval_split)
        else:
            results[kind] = run_caption(model, refs, data_config, caption_config)
        timings[kind] = round(time.perf_counter() - tick, 2)
    timings["total"] = round(time.perf_counter() - started, 2)
    write_outputs(results, run_config.out)
    return results


def write_outputs(results: dict[str, Any], out: str) -> None:
    """``results.json`` and ``results.md`` (summary table + per-task class tables)."""
    report.write_json(os.path.join(out, "results.json"), results)
    sections = [f"# Evaluation of {results['checkpoint']}\n\ndata: {results['data']}\n",
                report.summary_markdown(results)]
    for kind in ("zeroshot", "linear_probe"):
        for task, result in results.get(kind, {}).items():
            if kind == "zeroshot":
                table = report.per_class_table(result)
                sections.append(f"## {task}, zero-shot ({result['split']} split)\n\n{table}")
            else:
                largest = list(result["fractions"])[-1]
                table = report.per_class_table(result["fractions"][largest])
                sections.append(f"## {task}, linear probe {float(largest) * 100:g} %\n\n{table}")
    with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as handle:
        handle.write("\n".join(sections))
