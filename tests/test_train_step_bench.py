"""benchmarks/train_step.py's lever combinations and its largest-micro-batch probe."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from benchmarks import train_step
from benchmarks.train_step import LEVERS, largest_batch, settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_combinations_merge_named_levers_left_to_right():
    assert settings("eager") == {}
    assert settings("fast+checkpoint") == {**LEVERS["fast"], **LEVERS["checkpoint"]}
    combined = settings("fused_ce+checkpoint+release_memory")
    assert combined["decoder.vocab_chunk"] == 1024 and combined["ecg.checkpoint_layers"] is True
    assert combined["env.MALLOC_MMAP_THRESHOLD_"] == "1048576"
    assert "optim.fused" not in combined
    with pytest.raises(ValueError, match="'bogus' in 'fast\\+bogus'"):
        settings("fast+bogus")


@pytest.mark.parametrize("peaks,budget,largest,refused", [
    ({1: 1.0, 2: 1.5, 4: 2.5, 8: 4.5}, 3.0, 4, 8),
    ({1: 1.0, 2: 1.5, 4: "error"}, 3.0, 2, 4),
    ({1: 3.5}, 3.0, None, 1),
])
def test_largest_batch_doubles_until_a_probe_passes_the_budget(monkeypatch, peaks, budget, largest, refused):
    asked = []

    def fake_worker(preset, lever, batch, steps, fit=False, budget_gb=None, **_):
        asked.append(batch)
        assert fit and steps == 1 and budget_gb == budget
        peak = peaks[batch]
        if peak == "error":
            return {"error": "exit status -9 (killed)"}
        return {"peak_memory_gb": peak}

    monkeypatch.setattr(train_step, "run_worker", fake_worker)
    found = largest_batch("paper", "fast", budget)
    assert asked == sorted(peaks)  # no probe beyond the first that did not fit
    assert (found["largest"] or {}).get("batch") == largest
    assert found["next"]["batch"] == refused
    assert [p["batch"] for p in found["probes"]] == asked


def test_a_probe_over_budget_ends_at_once_with_its_peak():
    """The CPU probe's watchdog: a process past the budget prints its result and exits instead
    of finishing steps that cannot fit."""
    code = ("import time; from benchmarks.train_step import stop_over_budget; "
            "stop_over_budget({'batch': 64}, 0.001, every_s=0.05); time.sleep(60)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=50, check=True)
    record = json.loads(done.stdout.split("RESULT ", 1)[1])
    assert record["over_budget"] is True and record["batch"] == 64 and record["peak_memory_gb"] > 0.001
