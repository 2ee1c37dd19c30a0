"""The report hash (multi-positive key): normalisation, stability across processes, and the loader's
``report_hash`` batch field."""
from __future__ import annotations

import os
import subprocess
import sys

import torch

from melp_scale.report_hash import normalise_report, report_hash
from tests.test_stream import loader, make_sample, make_shards, tokenizer  # noqa: F401 (fixture)


def test_normalisation_and_range() -> None:
    assert normalise_report(" Sinus  rhythm.\n Normal ECG. ") == "sinus rhythm. normal ecg."
    assert normalise_report("", ["Sinus rhythm", " Normal ECG. "]) == "sinus rhythm. normal ecg."
    assert normalise_report("ＳＴ elevation") == "st elevation"  # NFKC: full-width letters
    same = {report_hash("Sinus rhythm. Normal ECG."), report_hash("sinus rhythm.  normal ecg. "),
            report_hash("", ["sinus rhythm", "normal ecg"])}
    assert len(same) == 1
    assert report_hash("sinus rhythm. normal ecg.") != report_hash("sinus bradycardia. normal ecg.")
    values = [report_hash(f"report {i}") for i in range(200)]
    assert len(set(values)) == 200 and all(0 <= v < 2**63 for v in values)


def test_hash_is_stable_across_processes() -> None:
    code = "from melp_scale.report_hash import report_hash; print(report_hash('Sinus rhythm. Normal ECG.'))"
    outputs = set()
    for seed in ("1", "2"):  # Python's own str hash differs between these interpreters
        env = {**os.environ, "PYTHONHASHSEED": seed}
        result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        outputs.add(int(result.stdout))
    assert outputs == {report_hash("sinus rhythm. normal ecg.")}


def test_loader_batches_carry_report_hash(tmp_path, tokenizer) -> None:  # noqa: F811
    make_shards(tmp_path, [5])
    reports = {(s := make_sample(0, i)).key: s.report for i in range(5)}
    batches = list(iter(loader(tmp_path, tokenizer, batch_size=3)))
    for batch in batches:
        assert batch["report_hash"].dtype == torch.int64 and batch["report_hash"].shape == (len(batch["keys"]),)
        assert batch["report_hash"].tolist() == [report_hash(reports[key]) for key in batch["keys"]]
    assert any(batch["is_repeat"].any() for batch in batches)  # 6 slots for 5 samples: the repeat hashes alike
