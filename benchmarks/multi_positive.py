"""Multi-positive targets on a toy with repeated reports: what the one-positive InfoNCE does to duplicates.

    python benchmarks/multi_positive.py                 # ~4 min on 2 busy CPU cores
    python benchmarks/multi_positive.py --seeds 5 --steps 600

MIMIC-like corpora repeat short machine reports ("sinus rhythm. normal ecg.") many times per
batch. With the paper's one-positive InfoNCE each copy's ECG is the only positive of its text
and the other copies' ECGs are negatives, although their texts are identical.

Finding: when the copies' text embeddings are identical (a deterministic text tower), the
one-positive loss already equals the multi-positive one — summed over a group of copies, the
row and column terms coincide (the positive logit equals its copies' logits), so loss and
gradients are the same to rounding; measurement 1 shows it at dropout 0. The targets differ
once the copies' embeddings differ, as under the text model's dropout in training (the demo's
MiniLM: 0.1): the one-positive loss then asks each ECG to match its own copy's dropout noise
and to score below the other copies. Two measurements, one-positive (``positive_ids=None``)
against multi-positive (``positive_ids`` = report ids):

1. Gradient: a batch of B unit ECG embeddings in which one report (one text embedding, then
   dropout per copy) is repeated k times, the copies' ECG embeddings near that text. The first-order rate at which a
   gradient step changes the mean squared distance between the copies' ECG embeddings
   (> 0: the loss pushes identical-report ECGs apart).
2. Learning: a 2-layer MLP "ECG encoder" and a per-report text embedding table (with dropout) trained
   contrastively on simulated data — C report classes with a heavy-tailed frequency (the
   commonest ~40 % of samples, as normal ECGs are), ECG = class centre + noise — then scored on
   a separately drawn held-out set: zero-shot accuracy and macro one-vs-rest AUC (cosine to each
   class's text embedding), and the mean cosine between held-out ECG embeddings of one class
   (how tightly identical-report ECGs cluster).

Writes ``benchmarks/results/multi_positive-<time>.json`` and prints a one-screen summary.
The losses are ``kernels.infonce_loss`` (the reference on a CPU, the Triton op on a GPU).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kernels import infonce_loss

LOG_SCALE = math.log(1 / 0.07)  # CLIP's initial temperature, the demo's logit_scale_init


def spread_rate(num_rows: int, repeats: int, dim: int, seed: int, multi: bool, dropout: float) -> float:
    """d/dη of the copies' mean squared distance under a step η along −∇ (first order)."""
    generator = torch.Generator().manual_seed(seed)
    t = torch.randn(num_rows, dim, generator=generator)
    t[:repeats] = t[0]  # one report, k copies
    keep = torch.rand(num_rows, dim, generator=generator) >= dropout  # the text model's dropout
    t = F.normalize(t * keep / (1 - dropout), dim=-1)
    centre = t.clone()
    centre[:repeats] = F.normalize(t[:repeats].mean(0), dim=-1)  # the copies' ECGs: near the report
    x = F.normalize(centre + 0.5 * torch.randn(num_rows, dim, generator=generator) / math.sqrt(dim), dim=-1)
    ids = torch.arange(num_rows)
    ids[:repeats] = 0
    x.requires_grad_()
    loss = infonce_loss(x, t, torch.tensor(LOG_SCALE), positive_ids=ids if multi else None)
    (grad,) = torch.autograd.grad(loss, x)
    copies, step = x[:repeats].detach(), -grad[:repeats]
    diff, diff_step = copies[:, None] - copies[None], step[:, None] - step[None]
    pairs = repeats * (repeats - 1)
    return float((2 * (diff * diff_step).sum()) / pairs)


def simulate(num: int, centres: torch.Tensor, probs: torch.Tensor, noise: float,
             generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.multinomial(probs, num, replacement=True, generator=generator)
    ecg = centres[labels] + noise * torch.randn(num, centres.shape[1], generator=generator)
    return ecg, labels


def macro_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over classes of the one-vs-rest ROC AUC (Mann-Whitney, ties averaged)."""
    aucs = []
    for c in range(scores.shape[1]):
        positive = labels == c
        n_pos, n_neg = int(positive.sum()), int((~positive).sum())
        if n_pos == 0 or n_neg == 0:
            continue
        order = scores[:, c].argsort()
        ranks = torch.empty(len(order), dtype=torch.float64)
        ranks[order] = torch.arange(1, len(order) + 1, dtype=torch.float64)
        values = scores[:, c]
        for v in values.unique():  # average ranks of ties
            tied = values == v
            if int(tied.sum()) > 1:
                ranks[tied] = ranks[tied].mean()
        aucs.append(float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)))
    return 100 * sum(aucs) / len(aucs)


def train_and_score(args: argparse.Namespace, seed: int, multi: bool) -> dict[str, float]:
    generator = torch.Generator().manual_seed(seed)  # the same data and init for both modes
    centres = torch.randn(args.classes, args.input_dim, generator=generator) / math.sqrt(args.input_dim) * 2
    rest = 1.0 / torch.arange(1, args.classes, dtype=torch.float64)  # Zipf tail
    probs = torch.cat([torch.tensor([args.top_share]), (1 - args.top_share) * rest / rest.sum()]).float()
    torch.manual_seed(seed)
    encoder = torch.nn.Sequential(torch.nn.Linear(args.input_dim, 128), torch.nn.GELU(), torch.nn.Linear(128, args.dim))
    texts = torch.nn.Embedding(args.classes, args.dim)
    logit_scale = torch.nn.Parameter(torch.tensor(LOG_SCALE))
    optimiser = torch.optim.AdamW([*encoder.parameters(), *texts.parameters(), logit_scale], lr=args.lr)
    duplicates = []
    for _ in range(args.steps):
        ecg, labels = simulate(args.batch, centres, probs, args.noise, generator)
        duplicates.append(args.batch - len(labels.unique()))
        x = F.normalize(encoder(ecg), dim=-1)
        t = F.normalize(F.dropout(texts(labels), args.text_dropout), dim=-1)
        loss = infonce_loss(x, t, logit_scale, positive_ids=labels if multi else None)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        with torch.no_grad():
            logit_scale.clamp_(0, math.log(100))
    ecg, labels = simulate(args.heldout, centres, probs, args.noise, torch.Generator().manual_seed(10_000 + seed))
    with torch.no_grad():
        x = F.normalize(encoder(ecg), dim=-1)
        t = F.normalize(texts.weight, dim=-1)
        scores = x @ t.T
        same = labels[:, None] == labels[None]
        off_diagonal = same & ~torch.eye(len(labels), dtype=torch.bool)
        cosines = x @ x.T
    return {
        "zero_shot_accuracy": 100 * float((scores.argmax(1) == labels).float().mean()),
        "zero_shot_macro_auc": macro_auc(scores.double(), labels),
        "same_report_ecg_cosine": float(cosines[off_diagonal].mean()),
        "ecg_text_cosine": float(scores.gather(1, labels[:, None]).mean()),
        "mean_duplicates_per_batch": statistics.mean(duplicates),
    }


def summarise(runs: list[dict[str, float]]) -> dict[str, list[float]]:
    return {key: [statistics.mean(r[key] for r in runs), statistics.pstdev(r[key] for r in runs)] for key in runs[0]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--classes", type=int, default=16)
    parser.add_argument("--top-share", type=float, default=0.4, help="frequency of the commonest report")
    parser.add_argument("--input-dim", type=int, default=32)
    parser.add_argument("--dim", type=int, default=32, help="embedding width")
    parser.add_argument("--noise", type=float, default=0.7, help="ECG noise around the class centre")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--text-dropout", type=float, default=0.1, help="dropout on the text embeddings")
    parser.add_argument("--heldout", type=int, default=2000)
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    for name in ("seeds", "steps", "batch", "heldout"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 <= args.text_dropout < 1:
        raise ValueError("--text-dropout must lie in [0, 1)")
    if not 0 < args.top_share < 1:
        raise ValueError("--top-share must lie in (0, 1)")
    start = time.time()
    gradient = {}
    for dropout in sorted({0.0, args.text_dropout}):
        for repeats in (2, 4, 8, 16):
            gradient[f"dropout={dropout} k={repeats}"] = {
                mode: summarise([{"rate": spread_rate(args.batch, repeats, args.dim, seed, mode == "multi", dropout)}
                                 for seed in range(args.seeds)])["rate"]
                for mode in ("single", "multi")}
    learning = {}
    for mode in ("single", "multi"):
        runs = []
        for seed in range(args.seeds):
            runs.append(train_and_score(args, seed, mode == "multi"))
            print(f"  {mode:6s} seed {seed}: zero-shot acc {runs[-1]['zero_shot_accuracy']:.1f}", flush=True)
        learning[mode] = summarise(runs)
    result = {"benchmark": "multi_positive", "settings": vars(args) | {"results": None},
              "gradient_spread_rate": gradient, "learning": learning,
              "seconds": time.time() - start, "load_average": os.getloadavg(),
              "torch": torch.__version__, "python": platform.python_version()}
    os.makedirs(args.results, exist_ok=True)
    path = os.path.join(args.results, f"multi_positive-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as handle:
        json.dump(result, handle, indent=2)
    print(f"\nMulti-positive targets (mean ± sd over {args.seeds} seeds; one-positive | multi-positive)")
    print("1. rate of change of the mean squared distance between the ECG embeddings of k copies of")
    print(f"   one report under a gradient step (> 0: pushed apart), B={args.batch}:")
    for repeats, modes in gradient.items():
        print(f"   {repeats:18s}: {modes['single'][0]:+.4f} ± {modes['single'][1]:.4f} | "
              f"{modes['multi'][0]:+.4f} ± {modes['multi'][1]:.4f}")
    print(f"2. toy training, text dropout {args.text_dropout}, {args.steps} steps, B={args.batch}, "
          f"{args.classes} reports, commonest "
          f"{100 * args.top_share:.0f} % (~{learning['single']['mean_duplicates_per_batch'][0]:.0f} "
          "duplicate rows per batch); held-out:")
    for key in ("zero_shot_accuracy", "zero_shot_macro_auc", "same_report_ecg_cosine", "ecg_text_cosine"):
        single, multi = learning["single"][key], learning["multi"][key]
        print(f"   {key:24s} {single[0]:8.3f} ± {single[1]:.3f} | {multi[0]:8.3f} ± {multi[1]:.3f}")
    print(f"written {path} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
