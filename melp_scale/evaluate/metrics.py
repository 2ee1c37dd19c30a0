"""Classification metrics of the evaluation: exact ROC-AUC, ROC curves, bootstrap CIs.

ROC-AUC is the Mann-Whitney statistic computed from ranks: with the scores of one class
ranked over all rows (ties get the average of the ranks they span),

    AUC = (sum of the positives' ranks - P (P + 1) / 2) / (P N)

for P positives and N negatives. This equals the area under the step ROC curve with ties
counted half (what scikit-learn's ``roc_auc_score`` computes), and it is exact: no curve is
interpolated. A class with no positive or no negative row has no AUC: it is reported as
absent (``nan`` here), never silently dropped; a macro average names how many classes it
averages.

Bootstrap 95 % confidence intervals resample the rows with replacement (seeded); each
replicate's per-class AUC is ``nan`` where the replicate lacks positives or negatives of that
class, its macro AUC is the mean over the classes it defines, and the interval is the 2.5 and
97.5 percentiles of the defined replicates.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from scipy.stats import rankdata


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Per-column ROC-AUC of ``scores`` (N, C) against 0/1 ``labels`` (N, C); ``nan`` where a
    column has no positive or no negative. 1-D inputs give a 0-d array."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.shape != scores.shape:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} differ in shape")
    ranks = rankdata(scores, method="average", axis=0)  # (N, C) average ranks for ties
    positives = labels.sum(axis=0)
    negatives = labels.shape[0] - positives
    rank_sum = np.where(labels, ranks, 0.0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives)
    return np.where((positives > 0) & (negatives > 0), auc, np.nan)


def macro_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Mean ROC-AUC over the classes that have positives and negatives (``nan`` if none)."""
    per_class = roc_auc(labels, scores)
    return float(np.nanmean(per_class)) if np.isfinite(per_class).any() else float("nan")


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rates, true positive rates) of one class, one point per distinct
    score (tied scores move together), from (0, 0) to (1, 1)."""
    labels = np.asarray(labels).astype(bool)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    sorted_scores, sorted_labels = np.asarray(scores)[order], labels[order]
    last_of_tie = np.r_[np.diff(sorted_scores) != 0, True]
    true_pos = np.cumsum(sorted_labels)[last_of_tie]
    false_pos = np.cumsum(~sorted_labels)[last_of_tie]
    num_pos, num_neg = max(int(labels.sum()), 1), max(int((~labels).sum()), 1)
    return np.r_[0.0, false_pos / num_neg], np.r_[0.0, true_pos / num_pos]


@dataclasses.dataclass
class AucResult:
    """Per-class and macro ROC-AUC (fractions, not percent) with bootstrap intervals."""

    classes: list[str]
    per_class: list[float | None]  # None: the class is absent (no positive or no negative)
    per_class_ci: list[tuple[float, float] | None]
    macro: float | None
    macro_ci: tuple[float, float] | None
    num_positives: list[int]
    num_rows: int
    absent: list[str]  # classes with no AUC on these rows

    def to_dict(self, scale: float = 100.0) -> dict:
        """JSON-ready, AUC values multiplied by ``scale`` (×100 as the paper reports)."""
        def s(value):
            return None if value is None else round(value * scale, 4)

        def ci(pair):
            return None if pair is None else [s(pair[0]), s(pair[1])]

        return {"macro_auc": s(self.macro), "macro_auc_ci95": ci(self.macro_ci),
                "num_rows": self.num_rows, "num_classes_scored": len(self.classes) - len(self.absent),
                "absent_classes": self.absent,
                "per_class": {name: {"auc": s(auc), "ci95": ci(pair), "positives": count}
                              for name, auc, pair, count in zip(self.classes, self.per_class,
                                                                 self.per_class_ci,
                                                                 self.num_positives)}}


def weighted_auc(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC-AUC of one class under row weights: ``weights`` (R, N) non-negative counts, one
    replicate per row -> (R,) AUCs (``nan`` where a replicate has no positive or negative).

    The Mann-Whitney statistic with multiplicities: sum over positive i, negative j of
    w_i w_j ([s_i > s_j] + 0.5 [s_i = s_j]) / (W_pos W_neg); rows sorted once, ties grouped.
    """
    labels = np.asarray(labels).astype(bool)
    order = np.argsort(np.asarray(scores, dtype=np.float64), kind="stable")
    sorted_scores = np.asarray(scores, dtype=np.float64)[order]
    group_starts = np.flatnonzero(np.r_[True, np.diff(sorted_scores) != 0])
    w = weights[:, order].astype(np.float64)  # (R, N) in ascending score order
    is_pos = labels[order]
    pos = np.add.reduceat(np.where(is_pos, w, 0.0), group_starts, axis=1)  # (R, G)
    neg = np.add.reduceat(np.where(is_pos, 0.0, w), group_starts, axis=1)  # (R, G)
    neg_below = np.cumsum(neg, axis=1) - neg  # negatives with strictly lower scores
    total_pos, total_neg = pos.sum(axis=1), neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (pos * (neg_below + 0.5 * neg)).sum(axis=1) / (total_pos * total_neg)
    return np.where((total_pos > 0) & (total_neg > 0), auc, np.nan)


def bootstrap_auc(labels: np.ndarray, scores: np.ndarray, num_samples: int = 1000,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per-class AUC (num_samples, C) and macro AUC (num_samples,) of bootstrap replicates.

    A replicate draws N rows with replacement, kept as per-row counts; every class of a
    replicate uses the same rows.
    """
    labels, scores = np.asarray(labels).astype(bool), np.asarray(scores, dtype=np.float64)
    num_rows, num_classes = labels.shape
    rows = np.random.default_rng(seed).integers(0, num_rows, size=(num_samples, num_rows))
    offsets = np.arange(num_samples)[:, None] * num_rows
    counts = np.bincount((rows + offsets).ravel(), minlength=num_samples * num_rows
                         ).reshape(num_samples, num_rows)  # (R, N) times each row is drawn
    per_class = np.stack([weighted_auc(labels[:, c], scores[:, c], counts)
                          for c in range(num_classes)], axis=1)  # (R, C)
    defined = np.isfinite(per_class).any(axis=1)
    macro = np.full(num_samples, np.nan)
    macro[defined] = np.nanmean(per_class[defined], axis=1)
    return per_class, macro


def _interval(values: np.ndarray) -> tuple[float, float] | None:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def evaluate_auc(labels: np.ndarray, scores: np.ndarray, classes: list[str],
                 num_bootstrap: int = 1000, seed: int = 0) -> AucResult:
    """AUC per class and macro on (N, C) labels / scores, with bootstrap 95 % CIs
    (``num_bootstrap=0`` skips the intervals)."""
    labels = np.asarray(labels).astype(bool)
    if labels.shape[1] != len(classes):
        raise ValueError(f"{labels.shape[1]} label columns for {len(classes)} classes")
    per_class = roc_auc(labels, scores)
    present = np.isfinite(per_class)
    macro = float(per_class[present].mean()) if present.any() else None
    class_ci: list[tuple[float, float] | None] = [None] * len(classes)
    macro_ci = None
    if num_bootstrap > 0 and present.any():
        boot_class, boot_macro = bootstrap_auc(labels[:, present], np.asarray(scores)[:, present],
                                               num_bootstrap, seed)
        for column, index in enumerate(np.flatnonzero(present)):
            class_ci[index] = _interval(boot_class[:, column])
        macro_ci = _interval(boot_macro)
    return AucResult(
        classes=list(classes),
        per_class=[float(v) if np.isfinite(v) else None for v in per_class],
        per_class_ci=class_ci, macro=macro, macro_ci=macro_ci,
        num_positives=[int(v) for v in labels.sum(axis=0)], num_rows=int(labels.shape[0]),
        absent=[name for name, ok in zip(classes, present) if not ok])
