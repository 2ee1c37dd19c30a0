"""CODE-15 % (Ribeiro et al. 2020, 2021): ``exams_part*.hdf5`` tracings + ``exams.csv`` labels.

Layout (the Zenodo release, record 4916206): each ``exams_partN.hdf5`` holds ``tracings``
(N, 4096, 12) float32 in mV at 400 Hz, leads in CODE order DI, DII, DIII, AVR, AVL, AVF,
V1-V6, and ``exam_id`` (N,) giving each row's exam; ``exams.csv`` has one row per exam:
``exam_id, age, is_male, nn_predicted_age, 1dAVb, RBBB, LBBB, SB, ST, AF, patient_id, death,
timey, normal_ecg, trace_file``. Records of 10 s (4000 samples) and 7 s (2800) are centred in
the 4096-sample array with zeros on both sides; the loader strips the all-zero rows at both
ends (an exam that is zero throughout is skipped as ``all_zero``), then the shared
preprocessing resamples 400 -> 500 Hz and pads 7 s records to the window (flagged).

Rows of an hdf5 file whose ``exam_id`` is not in ``exams.csv`` (the release ends some parts
with an ``exam_id`` 0 row) are left out; exams listed without a tracing (parts not
downloaded) are counted as ``no_tracing``. Labels for evaluation: ``code15`` lists the
positive classes among 1dAVb, RBBB, LBBB, SB, AF, ST; ``code15_normal`` is ``normal_ecg``.
There are no reports. Subject = ``patient_id`` (the split keeps a patient's exams together).
"""
from __future__ import annotations

import functools
import glob
import os

import numpy as np
import pandas as pd

from melp_scale.shard.record import RawSignal, RecordRef, SkipRecord
from melp_scale.shard.sources import Listing, SourceOptions, require_file

FS = 400
# CODE's lead order and names, and the canonical name of each (preprocess maps by name)
CODE_LEADS = ("DI", "DII", "DIII", "AVR", "AVL", "AVF", "V1", "V2", "V3", "V4", "V5", "V6")
CANONICAL_NAMES = {"DI": "I", "DII": "II", "DIII": "III", "AVR": "aVR", "AVL": "aVL", "AVF": "aVF"}
CLASSES = ("1dAVb", "RBBB", "LBBB", "SB", "AF", "ST")


def load_code15(path: str, row: int) -> RawSignal:
    """Row ``row`` of an ``exams_part*.hdf5``, zero padding stripped, leads named canonically."""
    import h5py

    with h5py.File(path, "r") as handle:
        tracing = np.asarray(handle["tracings"][row], dtype=np.float64)  # (4096, 12) mV
    if tracing.ndim != 2 or tracing.shape[1] != len(CODE_LEADS):
        raise SkipRecord("bad_shape", f"tracing {tracing.shape}, expected (samples, 12)")
    nonzero = np.flatnonzero(np.any(tracing != 0, axis=1))
    if nonzero.size == 0:
        raise SkipRecord("all_zero", "the tracing is zero throughout")
    signal = tracing[nonzero[0]:nonzero[-1] + 1]  # (n, 12): the recording without its padding
    return RawSignal(signal, float(FS), [CANONICAL_NAMES.get(n, n) for n in CODE_LEADS])


def _flag(value: object) -> bool:
    return str(value).strip().lower() in ("true", "1", "1.0")


def tracing_rows(root: str) -> dict[int, tuple[str, int]]:
    """exam_id -> (hdf5 path, row) over every ``exams_part*.hdf5`` under ``root``."""
    import h5py

    paths = sorted(glob.glob(os.path.join(root, "exams_part*.hdf5")))
    if not paths:
        raise ValueError(f"--root {root!r} has no exams_part*.hdf5: is it the CODE-15 % folder?")
    rows: dict[int, tuple[str, int]] = {}
    real_root = os.path.realpath(root).rstrip(os.sep) + os.sep
    for path in paths:
        if not os.path.realpath(path).startswith(real_root):  # never follow a link out of --root
            raise ValueError(f"{path} resolves to {os.path.realpath(path)}, outside --root {root}")
        with h5py.File(path, "r") as handle:
            if "tracings" not in handle or "exam_id" not in handle:
                raise ValueError(f"{path}: expected datasets 'tracings' and 'exam_id'")
            exam_ids = np.asarray(handle["exam_id"])
        for row, exam_id in enumerate(exam_ids.tolist()):
            rows.setdefault(int(exam_id), (path, row))
    return rows


def list_records(root: str, options: SourceOptions) -> Listing:
    exams = pd.read_csv(require_file(root, "exams.csv"))
    missing = [c for c in ("exam_id", "patient_id", *CLASSES) if c not in exams]
    if missing:
        raise ValueError(f"{root}/exams.csv lacks column(s) {', '.join(missing)}")
    rows = tracing_rows(root)
    refs, skipped = [], []
    for exam in exams.to_dict("records"):
        exam_id = int(exam["exam_id"])
        if exam_id not in rows:
            skipped.append((str(exam_id), "no_tracing", "in exams.csv, in no exams_part*.hdf5"))
            continue
        path, row = rows[exam_id]
        labels = {"code15": [c for c in CLASSES if _flag(exam[c])]}
        if "normal_ecg" in exam:
            labels["code15_normal"] = _flag(exam["normal_ecg"])
        age = exam.get("age")
        refs.append(RecordRef(
            record_id=str(exam_id), subject=str(int(exam["patient_id"])),
            load=functools.partial(load_code15, path, row), labels=labels,
            meta={"hdf5": os.path.basename(path), "row": row,
                  "age": None if pd.isna(age) else float(age),
                  "sex": None if "is_male" not in exam else ("M" if _flag(exam["is_male"]) else "F")}))
    return Listing(refs, skipped)
