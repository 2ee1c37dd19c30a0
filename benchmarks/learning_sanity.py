"""Learning sanity: does the demo recipe recover every simulated factor, zero-shot?

    python benchmarks/learning_sanity.py --record             # the demo recipe as shipped
    python benchmarks/learning_sanity.py --steps 300 optim.lr=5e-4 data.normalize=zscore

1. Simulates a training set (``synthetic.DEMO_SET``, seed 0) and a separately simulated held-out
   set (other subjects, seed ``--heldout-seed``) with independent factors: rate class, rhythm
   (sinus rhythm / atrial fibrillation), QRS width (a bundle-branch-like morphology), limb-lead voltage and noise
   (``melp_scale/shard/sources/synthetic.py``).
2. Trains the demo model on the CPU through the real Trainer (``launch/configs/demo.yaml``, the
   repository's ``ds.json``, DeepSpeed in-process as a world of one), scoring the held-out set
   zero-shot every ``--eval-every`` steps (per factor: macro ROC-AUC x 100 of the cosine between
   the ECG embedding and each class's description in ``melp_scale/evaluate/prompts/``).
3. At the end: zero-shot AUC with bootstrap 95 % CIs and a linear probe (frozen features, a
   seeded subject split of the held-out set) per factor.
4. Writes ``learning_sanity-*.json`` (every figure, the settings, the load average, versions)
   and a PNG of per-factor AUC against training steps into a fresh temporary folder, or into
   ``benchmarks/results/`` (tracked) with ``--record``.

The CPU is usually shared: the JSON records the load average next to the timings.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from melp_scale.evaluate.metrics import evaluate_auc, roc_auc
from melp_scale.evaluate.tasks import tasks_for_source
from melp_scale.shard.sources import synthetic
from melp_scale.stream import EcgTransform
from melp_scale.train.melp_task import MELPTask


@dataclasses.dataclass
class HeldOut:
    """The held-out set in memory: inputs as the model sees them, labels per task."""

    ecg: torch.Tensor  # (N, 12, T) preprocessed as in training (no lead mask)
    subjects: list[str]
    labels: dict[str, np.ndarray]  # task name -> (N, C) 0/1
    classes: dict[str, list[str]]


def load_held_out(directory: str, normalize: str) -> HeldOut:
    from melp_scale.evaluate.data import index_shards, iter_ecg_batches

    refs, _ = index_shards(directory)
    transform = EcgTransform(normalize, lead_mask_p=0.0)
    ecg = torch.cat([batch for _, batch in iter_ecg_batches(refs, transform, 64)])
    tasks = tasks_for_source("synthetic")
    labels = {t.name: np.asarray([t.label_row(r.meta["labels"]) for r in refs], dtype=np.uint8)
              for t in tasks}
    return HeldOut(ecg, [str(r.meta["subject"]) for r in refs], labels,
                   {t.name: t.class_names for t in tasks})


@torch.no_grad()
def embed(model, ecg: torch.Tensor, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(global (N, E) L2-normalised, linear-probe features (N, E)) in eval mode."""
    was_training = model.training
    model.eval()
    outs, feats = [], []
    for start in range(0, len(ecg), batch_size):
        tokens = model.ecg_encoder(ecg[start:start + batch_size])
        pooled = model.beat_pooler.pooled(tokens)
        beats = model.beat_pooler.proj_contrast(pooled)
        outs.append(torch.nn.functional.normalize(beats.mean(dim=1), dim=-1))
        feats.append(pooled.mean(dim=1))
    model.train(was_training)
    return torch.cat(outs).double().numpy(), torch.cat(feats).double().numpy()


@torch.no_grad()
def zeroshot_scores(model, held_out: HeldOut, ecg_global: np.ndarray) -> dict[str, np.ndarray]:
    """Task -> (N, C) cosines of the ECG embeddings with each class description."""
    was_training = model.training
    model.eval()
    scores = {}
    for task in tasks_for_source("synthetic"):
        text = model.encode_text(task.prompts()).double().numpy()
        scores[task.name] = ecg_global @ text.T
    model.train(was_training)
    return scores


def zeroshot_macro(model, held_out: HeldOut) -> dict[str, float]:
    ecg_global, _ = embed(model, held_out.ecg)
    scores = zeroshot_scores(model, held_out, ecg_global)
    return {name: float(np.nanmean(roc_auc(held_out.labels[name], s)) * 100)
            for name, s in scores.items()}


class SanityTask(MELPTask):
    """The demo's MELP task, scoring the held-out set zero-shot every ``eval_every`` steps."""

    def __init__(self, config, held_out: HeldOut, eval_every: int):
        super().__init__(config)
        self.held_out, self.eval_every = held_out, eval_every
        self.step, self.curve, self.started = 0, [], time.time()

    def after_step(self, model) -> None:
        super().after_step(model)
        self.step += 1
        if self.step % self.eval_every == 0:
            self.record(model)

    def record(self, model) -> None:
        aucs = zeroshot_macro(model, self.held_out)
        self.curve.append({"step": self.step, "seconds": round(time.time() - self.started, 1),
                           "zeroshot": {k: round(v, 2) for k, v in aucs.items()}})
        print(f"step {self.step}: " + ", ".join(f"{k[10:]} {v:.1f}" for k, v in aucs.items()),
              flush=True)


def final_scores(model, held_out: HeldOut, seed: int, bootstrap: int) -> dict[str, Any]:
    """Zero-shot (all held-out rows) and linear probe (subject split) per factor."""
    from melp_scale.evaluate.data import seeded_split
    from melp_scale.evaluate.linear_probe import ProbeConfig, fit_probe

    ecg_global, features = embed(model, held_out.ecg)
    scores = zeroshot_scores(model, held_out, ecg_global)
    splits = seeded_split(held_out.subjects, seed, 0.1, 0.3)
    out = {}
    for name, labels in held_out.labels.items():
        classes = held_out.classes[name]
        zero = evaluate_auc(labels, scores[name], classes, bootstrap, seed).to_dict()
        rows = {s: np.flatnonzero(splits == s) for s in ("train", "val", "test")}
        layer, _ = fit_probe(features[rows["train"]].astype(np.float32), labels[rows["train"]],
                             features[rows["val"]].astype(np.float32), labels[rows["val"]],
                             ProbeConfig(fractions=(1.0,), seed=seed))
        with torch.no_grad():
            probe_scores = torch.sigmoid(layer(torch.from_numpy(
                features[rows["test"]].astype(np.float32)))).numpy()
        probe = evaluate_auc(labels[rows["test"]], probe_scores, classes, bootstrap, seed).to_dict()
        out[name] = {"zeroshot": zero, "linear_probe": probe}
    return out


def build_sets(work: str, heldout_seed: int, heldout_count: int, workers: int) -> tuple[str, str]:
    from melp_scale.shard.build import run_build

    train = os.path.join(work, "train")
    held_out = os.path.join(work, "heldout")
    run_build(synthetic.demo_build_config(train, workers=workers))
    run_build(synthetic.demo_build_config(held_out, workers=workers, seed=heldout_seed,
                                          count=heldout_count, val_fraction=0.0))
    return train, held_out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="demo", help="training preset or YAML (default demo)")
    parser.add_argument("--ds_config", default=str(ROOT / "ds.json"))
    parser.add_argument("--steps", type=int, help="optimiser steps (default: the preset's max_steps)")
    parser.add_argument("--eval-every", type=int, default=25, help="steps between held-out scores")
    parser.add_argument("--heldout-seed", type=int, default=1000)
    parser.add_argument("--heldout-count", type=int, default=256)
    parser.add_argument("--bootstrap", type=int, default=500)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--work", help="folder for shards and the run (default: a temp folder)")
    parser.add_argument("--record", action="store_true",
                        help="write the results into benchmarks/results/ (tracked)")
    parser.add_argument("--results", help="folder for the results (default: a temporary "
                        "folder, or benchmarks/results/ with --record)")
    parser.add_argument("overrides", nargs="*", help="training key=value overrides")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from harness import environment

    from melp_scale.train.config import load_train_config, read_deepspeed_overrides
    from melp_scale.train.loop import Trainer

    load_before = os.getloadavg()
    started = time.time()
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work or scratch
        train_dir, held_dir = build_sets(work, args.heldout_seed, args.heldout_count, args.workers)
        build_seconds = time.time() - started
        overrides = [f"data.shards={train_dir}", f"run.out={os.path.join(work, 'run')}",
                     "data.build_demo_if_missing=false", "run.select_every=0", *args.overrides]
        overrides += [f"optim.max_steps={args.steps}"] if args.steps else []
        config = load_train_config(args.config, overrides)
        held_out = load_held_out(held_dir, config.data.normalize)
        task = SanityTask(config, held_out, args.eval_every)
        trainer = Trainer(task, args.ds_config,
                          ds_overrides=read_deepspeed_overrides(args.config, overrides))
        try:
            summary = trainer.run()
            if not task.curve or task.curve[-1]["step"] != task.step:
                task.record(trainer.model)
            train_seconds = time.time() - started - build_seconds
            final = final_scores(trainer.model, held_out, 0, args.bootstrap)
        finally:
            trainer.close()
    result = {"benchmark": "learning_sanity", **environment(torch.device("cpu")),
              "settings": {"config": args.config, "overrides": overrides[4:],
                           "train_config": config.to_dict(), "ds_config": args.ds_config,
                           "train_set": dataclasses.asdict(synthetic.demo_build_config("-")),
                           "heldout_seed": args.heldout_seed, "heldout_count": args.heldout_count},
              "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "seconds": {"build": round(build_seconds, 1), "train": round(train_seconds, 1),
                          "total": round(time.time() - started, 1)},
              "steps": task.step, "final_train_loss": summary.get("train", {}),
              "curve": task.curve, "final": final,
              "min_zeroshot_macro_auc": min(v["zeroshot"]["macro_auc"] for v in final.values())}
    stem = f"learning_sanity-{time.strftime('%Y%m%d-%H%M%S')}"
    if args.results is None:
        args.results = (str(ROOT / "benchmarks" / "results") if args.record
                        else tempfile.mkdtemp(prefix="learning_sanity-"))
    os.makedirs(args.results, exist_ok=True)
    path = os.path.join(args.results, stem + ".json")
    with open(path, "w") as handle:
        json.dump(result, handle, indent=1, default=str)
    plot_curve(task.curve, os.path.join(args.results, stem + ".png"))
    print_table(final, result)
    print(f"wrote {path} and {stem}.png")
    return 0


def plot_curve(curve: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(7, 4))
    steps = [point["step"] for point in curve]
    for name in curve[0]["zeroshot"]:
        axis.plot(steps, [point["zeroshot"][name] for point in curve], marker="o", label=name)
    axis.axhline(90, color="grey", linestyle="--", linewidth=0.8)
    axis.set_xlabel("training step")
    axis.set_ylabel("held-out zero-shot macro AUC x 100")
    axis.set_ylim(40, 101)
    axis.legend(loc="lower right", fontsize=8)
    axis.set_title("Learning sanity: demo recipe, separately simulated held-out set")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_table(final: dict[str, Any], result: dict[str, Any]) -> None:
    print(f"\n== learning sanity: {result['steps']} steps, build {result['seconds']['build']} s, "
          f"train {result['seconds']['train']} s, load {result['load_average_after'][0]:.1f} ==")
    print(f"{'factor':<20}{'zero-shot AUC [95% CI]':<30}{'linear probe AUC':<18}")
    for name, scores in final.items():
        zero, probe = scores["zeroshot"], scores["linear_probe"]
        ci = [f"{v:.1f}" for v in zero["macro_auc_ci95"]] if zero["macro_auc_ci95"] else ["-", "-"]
        print(f"{name:<20}{zero['macro_auc']:>6.1f} [{ci[0]}, {ci[1]}]{'':<14}"
              f"{probe['macro_auc']:>6.1f}")
    lowest = result["min_zeroshot_macro_auc"]
    print(f"lowest zero-shot macro AUC {lowest:.1f}: the >= 90 goal on every factor is "
          f"{'met' if lowest >= 90 else 'NOT met'}")


if __name__ == "__main__":
    sys.exit(main())
