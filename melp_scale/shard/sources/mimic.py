"""MIMIC-IV-ECG: ``record_list.csv`` + ``machine_measurements.csv`` (report_0..report_17)."""
from __future__ import annotations

import functools
import os

import pandas as pd

from melp_scale.shard.preprocess import clean_report
from melp_scale.shard.record import RecordRef
from melp_scale.shard.sources import Listing, SourceOptions, require_file
from melp_scale.shard.sources.wfdb_io import load_wfdb

NUM_REPORT_FIELDS = 18


def list_records(root: str, options: SourceOptions) -> Listing:
    records = pd.read_csv(require_file(root, "record_list.csv"), dtype=str)
    measurements = pd.read_csv(require_file(root, "machine_measurements.csv"), dtype=str)
    fields = [f"report_{k}" for k in range(NUM_REPORT_FIELDS) if f"report_{k}" in measurements]
    if not fields:
        raise ValueError(f"{root}/machine_measurements.csv has no report_0..report_17 columns")
    reports = {}
    for row in measurements[["study_id"] + fields].itertuples(index=False):
        reports[row[0]] = [str(value) for value in row[1:] if isinstance(value, str) and value.strip()]
    refs, skipped = [], []
    for row in records.itertuples(index=False):
        record_id = str(row.study_id)
        statements = reports.get(record_id)
        report, sentences = clean_report(statements or [])
        if not report:
            skipped.append((record_id, "no_report", "no machine_measurements row with text"))
            continue
        refs.append(RecordRef(
            record_id=record_id, subject=str(row.subject_id),
            load=functools.partial(load_wfdb, os.path.join(root, row.path)),
            report=report, sentences=sentences,
            meta={"study_id": record_id, "ecg_time": str(getattr(row, "ecg_time", ""))}))
    return Listing(refs, skipped)
