"""Report generation scored against the reference reports.

Reports are generated (``MELP.generate``: greedy, or beam search with ``beams > 1``) for the
samples of a shard-set split and compared with the clean reference reports:

- **BLEU-4**: corpus BLEU of sacrebleu (its standard ``13a`` tokenisation, lowercase), 0-100;
- **ROUGE-L**: mean F-measure of Google's ``rouge-score`` package (Porter stemming), × 100;
- **clinical-statement F1**: both texts are mapped to the set of common ECG statements of
  ``STATEMENTS`` they assert (regular expressions on the lowercased text; negated mentions are
  not modelled), then micro F1 over all (sample, statement) pairs and macro F1 over the
  statements that occur in the references, × 100.

On PTB-XL shards (``python -m melp_scale.shard build --source ptbxl``: the database's free-text
``report`` column, cleaned as in pretraining) ``split="test"`` (the default ``auto`` there)
captions the benchmark test fold (``strat_fold`` 10), whose patients no PTB-XL split of
another fold holds. PTB-XL reports are written in German, English or Swedish (most in
German): a model pretrained on English reports is scored against them as they are, so BLEU
and ROUGE there measure the language gap too; the statement F1 patterns are English.

METEOR (nltk) needs the WordNet corpus, which nltk downloads at run time and which is not
installable from PyPI, and BERTScore needs a model download: both fail offline and are left
out. sacrebleu and rouge-score are pure-Python PyPI packages and work with no network.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np

from melp_scale.evaluate.data import DataConfig, SampleRef, iter_ecg_batches, make_transform
from melp_scale.evaluate.retrieval import split_positions

# (statement, pattern): common statements of machine and cardiologist ECG reports
STATEMENTS: tuple[tuple[str, str], ...] = (
    ("sinus rhythm", r"\bsinus rhythm\b"),
    ("sinus bradycardia", r"\bsinus brady"),
    ("sinus tachycardia", r"\bsinus tachy"),
    ("sinus arrhythmia", r"\bsinus arrhythmia"),
    ("atrial fibrillation", r"\batrial fibrillation|\bafib\b"),
    ("atrial flutter", r"\batrial flutter"),
    ("regular rhythm", r"\bregular rhythm"),  # \b: "irregular" does not match
    ("irregular rhythm", r"\birregular rhythm"),
    ("premature ventricular complexes", r"\b(premature ventricular|ventricular premature|pvcs?\b)"),
    ("premature atrial complexes", r"\b(premature atrial|atrial premature|pacs?\b)"),
    ("first degree av block", r"\b(1st|first) degree a-?v block"),
    ("left bundle branch block", r"\bleft bundle branch block|\blbbb\b"),
    ("right bundle branch block", r"\bright bundle branch block|\brbbb\b"),
    ("left anterior fascicular block", r"\bleft anterior fascicular block"),
    ("left axis deviation", r"\bleft axis deviation"),
    ("right axis deviation", r"\bright axis deviation"),
    ("left ventricular hypertrophy", r"\bleft ventricular hypertrophy|\blvh\b"),
    ("low qrs voltage", r"\blow (qrs )?voltage"),
    ("st elevation", r"\bst (segment )?elevation|\bst elev"),
    ("st depression", r"\bst (segment )?depression|\bst dep"),
    ("t wave abnormality", r"\bt[- ]wave (abnormalit|inversion|changes)|\bt abnormal"),
    ("prolonged qt", r"\b(prolonged|long) qt"),
    ("myocardial infarction", r"\binfarct"),
    ("pacemaker", r"\bpaced\b|\bpacemaker"),
    ("normal ecg", r"\bnormal ecg\b"),
    ("abnormal ecg", r"\babnormal ecg\b"),
    ("noisy recording", r"\bnois|\bartifact|\bartefact"),
)
_COMPILED = tuple((name, re.compile(pattern)) for name, pattern in STATEMENTS)


@dataclasses.dataclass
class CaptionConfig:
    """Report-generation settings."""

    split: str = "val"  # split to caption ("train", "val", "test" = PTB-XL fold 10, or "all")
    max_samples: int | None = 64  # caption at most this many samples of the split (None: all)
    beams: int = 1  # 1 = greedy decoding
    max_len: int | None = None  # tokens per generated report (None: the model's text max_length)
    num_examples: int = 5  # generated/reference pairs kept in the results

    def __post_init__(self) -> None:
        if self.beams < 1:
            raise ValueError(f"--beams must be >= 1, got {self.beams}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"--max-samples must be >= 1, got {self.max_samples}")


def statements(text: str) -> set[str]:
    """The statements of ``STATEMENTS`` that ``text`` asserts."""
    lowered = text.lower()
    return {name for name, pattern in _COMPILED if pattern.search(lowered)}


def statement_f1(hypotheses: list[str], references: list[str]) -> dict[str, Any]:
    """Micro and macro F1 (× 100) of the statements found in hypotheses vs references."""
    names = [name for name, _ in STATEMENTS]
    hyp = np.asarray([[n in statements(h) for n in names] for h in hypotheses], dtype=bool)
    ref = np.asarray([[n in statements(r) for n in names] for r in references], dtype=bool)
    true_pos, false_pos, false_neg = (hyp & ref).sum(0), (hyp & ~ref).sum(0), (~hyp & ref).sum(0)
    micro = _f1(true_pos.sum(), false_pos.sum(), false_neg.sum())
    present = ref.any(axis=0)
    per_statement = {n: round(_f1(t, p, f) * 100, 4) for n, t, p, f, ok in
                     zip(names, true_pos, false_pos, false_neg, present) if ok}
    macro = float(np.mean(list(per_statement.values()))) if per_statement else 0.0
    return {"statement_f1_micro": round(micro * 100, 4), "statement_f1_macro": round(macro, 4),
            "statement_f1_per_statement": per_statement}


def _f1(true_pos: int, false_pos: int, false_neg: int) -> float:
    denominator = 2 * true_pos + false_pos + false_neg
    return float(2 * true_pos / denominator) if denominator else 1.0


def text_metrics(hypotheses: list[str], references: list[str]) -> dict[str, Any]:
    """BLEU-4 (sacrebleu corpus BLEU), ROUGE-L F (rouge-score) and statement F1, all × 100."""
    import sacrebleu
    from rouge_score import rouge_scorer

    bleu = sacrebleu.corpus_bleu(hypotheses, [references], lowercase=True)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(hypotheses, references)]
    return {"bleu4": round(bleu.score, 4), "rougeL": round(float(np.mean(rouge)) * 100, 4),
            **statement_f1(hypotheses, references)}


def run_caption(model, refs: list[SampleRef], data_config: DataConfig, config: CaptionConfig
                ) -> dict[str, Any]:
    """Generate reports for the split's samples and score them against the references."""
    positions = split_positions(refs, config.split)[:config.max_samples]
    chosen = [refs[i] for i in positions]
    if not all(r.report.strip() for r in chosen):
        raise ValueError("caption needs reference reports: some samples of this shard set have none")
    model.eval()
    device = next(model.parameters()).device
    hypotheses: list[str] = []
    for _, ecg in iter_ecg_batches(chosen, make_transform(data_config), data_config.batch_size):
        _, texts = model.generate(ecg.to(device), max_len=config.max_len, beams=config.beams,
                                  tokenizer=model.tokenizer)
        hypotheses.extend(t.strip() for t in texts)
    references = [r.report for r in chosen]
    return {"kind": "caption", "split": config.split, "num_reports": len(chosen),
            "beams": config.beams, **text_metrics(hypotheses, references),
            "examples": [{"key": r.key, "generated": h, "reference": r.report}
                         for r, h in zip(chosen[:config.num_examples], hypotheses)]}
