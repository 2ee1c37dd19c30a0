"""--source code15: a synthetic file set in the CODE-15 % layout (exams_part*.hdf5 + exams.csv)
built into shards: padding stripped, 400 -> 500 Hz, labels, patients kept together, skips."""
from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
from scipy.signal import resample_poly

h5py = pytest.importorskip("h5py")

from melp_scale.evaluate.tasks import get_task  # noqa: E402
from melp_scale.shard.build import BuildConfig, run_build  # noqa: E402
from melp_scale.shard.preprocess import SignalConfig  # noqa: E402
from tests.shard_trees import ecg_like  # noqa: E402
from tests.test_shard import manifest_of, read_all  # noqa: E402

GAIN = SignalConfig().gain
COLUMNS = ["exam_id", "age", "is_male", "nn_predicted_age", "1dAVb", "RBBB", "LBBB", "SB", "ST",
           "AF", "patient_id", "death", "timey", "normal_ecg", "trace_file"]


def code15_tree(root: str) -> dict[int, dict]:
    """Two parts; exams of 10 s and 7 s centred in 4096 zeros, one all-zero exam, a trailing
    exam_id-0 row, and one exam listed without a tracing. Returns what each exam holds."""
    rng = np.random.default_rng(3)
    exams = {  # exam_id: (part, seconds, patient, positive classes, normal)
        101: (0, 10, 7, ["1dAVb", "AF"], False), 102: (0, 7, 7, [], True),
        103: (0, 0, 8, ["RBBB"], False), 201: (1, 10, 9, ["LBBB", "SB", "ST"], False),
        202: (1, 10, 10, [], True), 999: (None, 10, 11, [], True)}
    parts: dict[int, list] = {0: [], 1: []}
    expected = {}
    for exam_id, (part, seconds, patient, classes, normal) in exams.items():
        signal = ecg_like(rng, seconds * 400, 400) if seconds else np.zeros((0, 12))
        expected[exam_id] = {"signal": signal, "patient": patient, "classes": classes, "normal": normal}
        if part is None:
            continue
        tracing = np.zeros((4096, 12), np.float32)
        start = (4096 - len(signal)) // 2
        tracing[start:start + len(signal)] = signal
        expected[exam_id]["signal"] = tracing[start:start + len(signal)].astype(np.float64)
        parts[part].append((exam_id, tracing))
    parts[1].append((0, np.zeros((4096, 12), np.float32)))  # the release's exam_id 0 row
    for part, rows in parts.items():
        with h5py.File(os.path.join(root, f"exams_part{part}.hdf5"), "w") as handle:
            handle["tracings"] = np.stack([t for _, t in rows])
            handle["exam_id"] = np.array([e for e, _ in rows], dtype=np.int64)
    table = []
    for exam_id, (part, _, patient, classes, normal) in exams.items():
        row = {c: False for c in ("1dAVb", "RBBB", "LBBB", "SB", "ST", "AF")}
        row |= {c: True for c in classes}
        table.append({**row, "exam_id": exam_id, "age": 60, "is_male": True, "nn_predicted_age": 61.0,
                      "patient_id": patient, "death": False, "timey": 1.0, "normal_ecg": normal,
                      "trace_file": f"exams_part{part}.hdf5"})
    pd.DataFrame(table, columns=COLUMNS).to_csv(os.path.join(root, "exams.csv"), index=False)
    return expected


def test_code15_layout_built_into_shards(tmp_path):
    root = str(tmp_path / "code15")
    os.makedirs(root)
    expected = code15_tree(root)
    out = str(tmp_path / "shards")
    run_build(BuildConfig(source="code15", root=root, out=out, val_fraction=0.34, shard_size=2))
    samples = read_all(out)
    assert {meta["record_id"] for _, meta, _ in samples.values()} == {"101", "102", "201", "202"}
    splits = {}
    for key, (ecg, meta, report) in samples.items():
        want = expected[int(meta["record_id"])]
        assert key == f"code15_{meta['record_id']}" and report == ""
        assert meta["subject"] == str(want["patient"]) and meta["fs"] == 500
        assert meta["labels"] == {"code15": want["classes"], "code15_normal": want["normal"]}
        # reference: the unpadded recording resampled 400 -> 500 Hz (5/4), lead order unchanged
        reference = resample_poly(want["signal"], 5, 4, axis=0).T  # (12, n * 5/4)
        length = reference.shape[1]
        assert ecg.shape == (12, 5000)
        assert np.abs(ecg[:, :length] / GAIN - reference).max() <= 0.5 / GAIN + 1e-9, key
        assert meta["flags"]["pad_samples"] == 5000 - length  # 7 s: 3500 samples + padding
        assert not ecg[:, length:].any()
        splits.setdefault(meta["subject"], set()).add(meta["split"])
    assert all(len(s) == 1 for s in splits.values())  # patient 7's two exams in one split
    task = get_task("code15")  # the evaluation task reads these labels
    assert len(task.prompts()) == 6
    for _, meta, _ in samples.values():
        classes = expected[int(meta["record_id"])]["classes"]
        assert task.label_row(meta["labels"]) == [int(c in classes) for c in task.class_names]
    skipped = {r["record_id"]: r["reason"] for r in manifest_of(out)["skipped_records"]}
    assert skipped == {"103": "all_zero", "999": "no_tracing"}


def test_code15_bad_root(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(ValueError, match="exams.csv"):
        run_build(BuildConfig(source="code15", root=str(root), out=str(tmp_path / "o")))
    pd.DataFrame(columns=COLUMNS).to_csv(root / "exams.csv", index=False)
    with pytest.raises(ValueError, match="exams_part"):
        run_build(BuildConfig(source="code15", root=str(root), out=str(tmp_path / "o")))
    with h5py.File(tmp_path / "elsewhere.hdf5", "w") as handle:
        handle["tracings"], handle["exam_id"] = np.zeros((1, 4096, 12)), np.array([5])
    os.symlink(tmp_path / "elsewhere.hdf5", root / "exams_part0.hdf5")
    with pytest.raises(ValueError, match="outside --root"):
        run_build(BuildConfig(source="code15", root=str(root), out=str(tmp_path / "o")))
