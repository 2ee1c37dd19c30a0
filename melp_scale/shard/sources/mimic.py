"""MIMIC-IV-ECG: ``record_list.csv`` + ``machine_measurements.csv`` (report_0..report_17)."""
from __future__ import annotations

import functools
import os

import pandas as pd

from melp_scale.shard.preprocess import clean_report
from melp_scale.shard.record import RecordRef
from melp_scale.shard.sources import Listing, SourceOptions, inside_root, require_file
from melp_scale.shard.sources.wfdb_io import load_wfdb

NUM_REPORT_FIELDS = 18


def list_records(root: str, options: SourceOptions) -> Listing:
    records = pd.read_csv(require_file(root, "record_list.csv"), dtype=str)
    measurements = pd.read_csv(require_file(root, "machine_measurements.csv"), dtype=str)
    fields = [f"report_{k}" for k in range(NUM_REPORT_FIELDS) if f"report_{k}" in measurements]
    if not fields:
        raise ValueError(f"{root}/machine_measurements.csv has no report_0..report_17 columns")
    reports, rows = {}, {}
    for line, row in enumerate(measurements[["study_id"] + fields].itertuples(index=False), start=2):
        if row[0] in rows:
            raise ValueError(f"{root}/machine_measurements.csv: study_id {row[0]} appears twice "
                             f"(lines {rows[row[0]]} and {line}); which report is right is unknowable")
        rows[row[0]] = line
        reports[row[0]] = [str(value) for value in row[1:] if isinstance(value, str) and value.strip()]
    refs, skipped = [], []
    for row in records.itertuples(index=False):
        record_id = str(row.study_id)
        statements = reports.get(record_id)
        report, sentences = clean_report(statements or [])
        if not report:
            skipped.append((record_id, "no_report", "no machine_measurements row with text"))
            continue
        path = os.path.join(root, str(row.path))
        if not inside_root(root, path + ".hea"):
            skipped.append((record_id, "outside_root", f"path {row.path!r} resolves outside --root"))
            continue
        refs.append(RecordRef(
            record_id=record_id, subject=str(row.subject_id),
            load=functools.partial(load_wfdb, path, root=root),
            report=report, sentences=sentences,
            meta={"study_id": record_id, "ecg_time": str(getattr(row, "ecg_time", ""))}))
    return Listing(refs, skipped)
