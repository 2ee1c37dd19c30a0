"""Runs the evaluations of one checkpoint on one shard set and writes every output.

Outputs under ``out``: ``results.json`` (everything, AUC × 100), ``results.md`` (the paper-style
table, the data/leakage table, then per-task class tables), ``roc/<kind>-<task>.png``,
``patient_id_cmc.png``, and ``cache/`` (features).

Leakage (provenance.py): before anything is scored, the shard set is compared with the
checkpoint's ``training_data.json``. A shard set the checkpoint was pretrained on (same
manifest or a shared shard file) is refused, and so is any evaluation whose scored subjects
(the test split; every row for ``--zeroshot-split all``; the chosen split for retrieval,
caption and patient identification) include subjects the checkpoint was trained on, unless
``allow_pretraining_rows``; each result then records, per split, the subjects and how many
were seen in pretraining.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import numpy as np

from melp_scale.evaluate import report
from melp_scale.evaluate.caption import CaptionConfig, run_caption
from melp_scale.evaluate.data import DataConfig, extract_features, index_shards, task_data
from melp_scale.evaluate.finetune import FinetuneConfig, run_finetune
from melp_scale.evaluate.linear_probe import ProbeConfig, run_linear_probe
from melp_scale.evaluate.patient_id import patient_positions, run_patient_id
from melp_scale.evaluate.provenance import PretrainingCheck
from melp_scale.evaluate.retrieval import run_retrieval, split_positions
from melp_scale.evaluate.tasks import Task, get_task, tasks_for_source
from melp_scale.evaluate.zeroshot import run_zeroshot

log = logging.getLogger(__name__)
KINDS = ("zeroshot", "linear-probe", "finetune", "retrieval", "caption", "patient-id")
ALL_KINDS = ("zeroshot", "linear-probe", "retrieval", "caption", "patient-id")  # --all: not finetune
CLASSIFICATION = ("zeroshot", "linear-probe", "finetune")
PROTOCOLS = {"ours": "every task on the shard's whole window",
             "melp": "as the MERL/MELP code: CPSC2018 input is its first 5 s, zero-padded to 10 s"}


@dataclasses.dataclass
class RunConfig:
    """What to evaluate and where the outputs go."""

    checkpoint: str  # folder written by MELP.save_pretrained (runs/<name>/export)
    out: str  # output folder
    kinds: tuple[str, ...] = ALL_KINDS  # evaluations to run
    tasks: tuple[str, ...] = ()  # task names (empty: every task the shard set provides)
    zeroshot_split: str = "test"  # task split zero-shot scores ("test" or "all")
    retrieval_split: str = "auto"  # retrieval split: train, val, test, all; auto: test if PTB-XL else val
    num_bootstrap: int = 1000  # bootstrap replicates of the AUC CIs (0: none)
    device: str = "cpu"  # torch device of the model
    skip_unavailable: bool = False  # skip (and note) what the data cannot provide instead of failing
    allow_pretraining_rows: bool = False  # score rows the checkpoint was pretrained on (flagged)
    prompts: str | None = None  # user prompt file {class: prompt or [prompts]} (None: ours)
    protocol: str = "ours"  # input protocol: "ours" or "melp" (PROTOCOLS)
    auc_scores: str = "sigmoid"  # "sigmoid" (per class) or "softmax" (compatibility only)
    patient_split: str = "test"  # patient identification: "test" or "all"

    def __post_init__(self) -> None:
        unknown = set(self.kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown evaluation(s) {sorted(unknown)}; choose from {', '.join(KINDS)}")
        if self.zeroshot_split not in ("train", "val", "test", "all"):
            raise ValueError(f"--zeroshot-split must be train, val, test or all, got {self.zeroshot_split!r}")
        if self.num_bootstrap < 0:
            raise ValueError(f"--bootstrap must be >= 0, got {self.num_bootstrap}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        if self.auc_scores not in ("sigmoid", "softmax"):
            raise ValueError(f"--auc-scores must be sigmoid or softmax, got {self.auc_scores!r}")
        if self.prompts is not None and not os.path.isfile(self.prompts):
            raise ValueError(f"--prompts {self.prompts!r} does not exist")


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


class Evaluation:
    """One checkpoint on one shard set: shared state of the evaluations (module docstring)."""

    def __init__(self, run_config: RunConfig, data_config: DataConfig):
        self.config, self.data_config = run_config, data_config
        self.check = PretrainingCheck.of(run_config.checkpoint, data_config.data)
        if self.check.same_shard_set and not run_config.allow_pretraining_rows:
            raise ValueError(
                f"--data {data_config.data!r} is the shard set {', '.join(self.check.same_shard_set)} "
                f"that {run_config.checkpoint!r} was pretrained on (its training_data.json lists the "
                "same manifest or shard files): its scores would count rows the model was trained on. "
                "Evaluate on a held-out shard set, or pass --allow-pretraining-rows (the results "
                "then say so)")
        self.model = load_model(run_config.checkpoint, run_config.device)
        self.refs, self.settings = index_shards(data_config.data)
        self._features: dict[Any, dict[str, np.ndarray]] = {}

    def data_config_for(self, task: Task | None) -> DataConfig:
        """The preprocessing of ``task`` under the protocol (melp: CPSC2018's first 5 s)."""
        if self.config.protocol == "melp" and task is not None and task.name == "cpsc2018":
            fs = int(self.settings.get("signal", {}).get("fs") or 500)
            return dataclasses.replace(self.data_config, head_samples=5 * fs)
        return self.data_config

    def features(self, task: Task | None = None) -> dict[str, np.ndarray]:
        config = self.data_config_for(task)
        if config.head_samples not in self._features:
            self._features[config.head_samples] = extract_features(
                self.model, self.refs, config, os.path.join(self.config.out, "cache"),
                self.config.checkpoint)
        return self._features[config.head_samples]

    def subjects(self, positions, what: str) -> dict[str, Any]:
        """``check.seen`` of the scored samples; refuses seen ones unless allowed."""
        seen = self.check.seen([self.refs[int(i)].meta for i in positions])
        if seen.get("seen_in_pretraining") is True and not self.config.allow_pretraining_rows:
            raise ValueError(
                f"{what}: {seen['subjects_trained_on']} of {seen['num_subjects']} scored subjects "
                f"were in the pretraining data of {self.config.checkpoint!r} (training_data.json). "
                "Use a split without them, or pass --allow-pretraining-rows (the results then say so)")
        return seen

    def make_model(self):
        return load_model(self.config.checkpoint, self.config.device).train()


def run(run_config: RunConfig, data_config: DataConfig, probe_config: ProbeConfig,
        caption_config: CaptionConfig, finetune_config: FinetuneConfig | None = None) -> dict[str, Any]:
    """Every requested evaluation; writes the outputs and returns the results dict."""
    started = time.perf_counter()
    evaluation = Evaluation(run_config, data_config)
    signal = evaluation.settings.get("signal", {})
    if (signal.get("fs"), evaluation.settings.get("num_samples")) != (500, 5000):
        log.warning("%s was built at fs=%s with %s samples; MELP pretraining uses 500 Hz, 5000 "
                    "samples (rebuild with --fs 500 --seconds 10 to match)", data_config.data,
                    signal.get("fs"), evaluation.settings.get("num_samples"))
    timings: dict[str, float] = {}
    results: dict[str, Any] = {
        "checkpoint": os.path.abspath(run_config.checkpoint), "data": os.path.abspath(data_config.data),
        "preprocessing": {"normalize": data_config.normalize, "crop_samples": data_config.crop_samples,
                          "shard_settings": signal, "leads": evaluation.settings.get("leads")},
        "protocol": {"name": run_config.protocol, "input": PROTOCOLS[run_config.protocol],
                     "auc_scores": run_config.auc_scores, "probe_preset": probe_config.preset,
                     "prompts": run_config.prompts and os.path.basename(run_config.prompts) or "melp-scale"},
        "pretraining": {**evaluation.check.summary(),
                        "allow_pretraining_rows": run_config.allow_pretraining_rows},
        "num_samples": len(evaluation.refs), "timings_s": timings}
    tick = time.perf_counter()
    evaluation.features()
    timings["features"] = round(time.perf_counter() - tick, 2)
    _classification(evaluation, results, probe_config, finetune_config or FinetuneConfig())
    _text_and_patients(evaluation, results, caption_config)
    timings["total"] = round(time.perf_counter() - started, 2)
    write_outputs(results, run_config.out)
    return results


def _classification(evaluation: Evaluation, results: dict[str, Any], probe_config: ProbeConfig,
                    finetune_config: FinetuneConfig) -> None:
    config, timings = evaluation.config, results["timings_s"]
    kinds = [k for k in config.kinds if k in CLASSIFICATION]
    for task in select_tasks(config.tasks, evaluation.refs) if kinds else []:
        task_config = evaluation.data_config_for(task)
        try:
            data = task_data(task, evaluation.refs, task_config)
        except ValueError as error:
            message = str(error)  # a task asked for, or a malformed split file: say why
            if config.tasks or ("--split-csv" in message and "no column for class" not in message):
                raise
            log.info("skipping %s: %s", task.name, message)
            results.setdefault("skipped", {})[task.name] = message
            continue
        subjects = {s: evaluation.check.seen([evaluation.refs[int(i)].meta
                                              for i in data.rows[data.split_rows(s)]])
                    for s in ("train", "val", "test")}
        for kind in kinds:
            tick = time.perf_counter()
            scored = (data.rows if kind == "zeroshot" and config.zeroshot_split == "all" else
                      data.rows[data.split_rows(config.zeroshot_split if kind == "zeroshot" else "test")])
            evaluation.subjects(scored, f"{kind} {task.name}")
            features = evaluation.features(task)
            if kind == "zeroshot":
                result, curves = run_zeroshot(evaluation.model, data, features["global"],
                                              config.zeroshot_split, config.num_bootstrap,
                                              evaluation.data_config.seed, config.prompts, config.auc_scores)
            elif kind == "linear-probe":
                result, curves = run_linear_probe(data, features["features"], probe_config,
                                                  config.num_bootstrap, config.auc_scores)
            else:
                result, curves = run_finetune(evaluation.make_model, data, evaluation.refs, task_config,
                                              finetune_config, config.num_bootstrap, config.device)
            result["protocol"] = config.protocol if task.name == "cpsc2018" else "ours"
            result["subjects"] = subjects
            result["split_counts"] = {s: int(len(data.split_rows(s))) for s in ("train", "val", "test")}
            results.setdefault(kind.replace("-", "_"), {})[task.name] = result
            timings[f"{kind}/{task.name}"] = round(time.perf_counter() - tick, 2)
            report.plot_roc(curves, os.path.join(config.out, "roc", f"{kind}-{task.name}.png"),
                            f"{kind} {task.name}")


def _text_and_patients(evaluation: Evaluation, results: dict[str, Any],
                       caption_config: CaptionConfig) -> None:
    config, refs, timings = evaluation.config, evaluation.refs, results["timings_s"]
    kinds = [k for k in ("retrieval", "caption", "patient-id") if k in config.kinds]
    if config.retrieval_split == "auto":  # PTB-XL: the test fold; otherwise the shard val split
        has_folds = any(r.meta.get("strat_fold") is not None for r in refs)
        config = dataclasses.replace(config, retrieval_split="test" if has_folds else "val")
    if caption_config.split == "auto":
        caption_config = dataclasses.replace(caption_config, split=config.retrieval_split)
    for kind in kinds:
        tick = time.perf_counter()
        try:
            if kind == "patient-id":
                positions, _ = patient_positions(refs, config.patient_split)
            else:
                split = caption_config.split if kind == "caption" else config.retrieval_split
                positions = split_positions(refs, split)
                if kind == "caption":
                    positions = positions[:caption_config.max_samples]
                if not all(refs[int(i)].report.strip() for i in positions):
                    raise ValueError(f"{kind} needs reports: some samples of this shard set have none")
            seen = evaluation.subjects(positions, kind)
            if kind == "retrieval":
                result = run_retrieval(evaluation.model, refs, evaluation.features()["global"],
                                       config.retrieval_split)
            elif kind == "caption":
                result = run_caption(evaluation.model, refs, evaluation.data_config, caption_config)
            else:
                result = run_patient_id(refs, evaluation.features(), config.patient_split,
                                        os.path.join(config.out, "patient_id_cmc.png"))
        except ValueError as error:
            if not config.skip_unavailable or "pretraining data" in str(error):
                raise
            results.setdefault("skipped", {})[kind] = str(error)
            continue
        result["subjects"] = seen
        results[kind.replace("-", "_")] = result
        timings[kind] = round(time.perf_counter() - tick, 2)


def write_outputs(results: dict[str, Any], out: str) -> None:
    """``results.json`` and ``results.md`` (summary table, data and leakage, class tables)."""
    report.write_json(os.path.join(out, "results.json"), results)
    sections = [f"# Evaluation of {results['checkpoint']}\n\ndata: {results['data']}\n",
                report.protocol_markdown(results), report.summary_markdown(results),
                report.data_markdown(results)]
    for kind in ("zeroshot", "linear_probe", "finetune"):
        for task, result in results.get(kind, {}).items():
            if kind == "zeroshot":
                table = report.per_class_table(result)
                sections.append(f"## {task}, zero-shot ({result['split']} split, prompts: "
                                f"{result['prompt_set']})\n\n{table}")
            else:
                largest = list(result["fractions"])[-1]
                table = report.per_class_table(result["fractions"][largest])
                name = "linear probe" if kind == "linear_probe" else "fine-tuning"
                sections.append(f"## {task}, {name} {float(largest) * 100:g} %\n\n{table}")
    with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as handle:
        handle.write("\n".join(s for s in sections if s))
