"""Any folder of WFDB records, with an optional CSV of reports keyed by record name.

Record ids are paths relative to the root without extension. With ``--reports FILE`` (columns
``record`` — the id or the bare name — and ``report``, optional ``subject``), records without a
report are skipped as ``no_report``; without it, records carry no text.
"""
from __future__ import annotations

import functools
import os

import pandas as pd

from melp_scale.shard.preprocess import clean_report, split_free_text
from melp_scale.shard.record import RecordRef
from melp_scale.shard.sources import Listing, SourceOptions, find_headers, inside_root
from melp_scale.shard.sources.wfdb_io import load_wfdb


def _read_reports(path: str) -> dict[str, tuple[str, str | None]]:
    if not os.path.isfile(path):
        raise ValueError(f"--reports {path!r} does not exist")
    frame = pd.read_csv(path, dtype=str)
    if not {"record", "report"} <= set(frame.columns):
        raise ValueError(f"--reports {path!r} needs columns 'record' and 'report'")
    subjects = frame["subject"] if "subject" in frame else [None] * len(frame)
    reports, lines = {}, {}
    for line, (record, text, subject) in enumerate(zip(frame["record"], frame["report"], subjects),
                                                   start=2):
        record = str(record).strip()
        if record in lines:
            raise ValueError(f"--reports {path!r}: record {record!r} appears twice (lines "
                             f"{lines[record]} and {line}); keep one row per record")
        lines[record] = line
        reports[record] = (text if isinstance(text, str) else "", subject)
    return reports


def list_records(root: str, options: SourceOptions) -> Listing:
    reports = _read_reports(options.reports) if options.reports else None
    refs, skipped = [], []
    for path in find_headers(root):
        record_id = os.path.relpath(path, root).replace(os.sep, "/")
        if not inside_root(root, path + ".hea"):
            skipped.append((record_id, "outside_root", "header is a link to outside --root"))
            continue
        subject, report, sentences = record_id, None, None
        if reports is not None:
            entry = reports.get(record_id) or reports.get(os.path.basename(path))
            report, sentences = clean_report(split_free_text(entry[0])) if entry else ("", [])
            if not report:
                skipped.append((record_id, "no_report", f"no report in {options.reports}"))
                continue
            subject = entry[1] if isinstance(entry[1], str) and entry[1] else record_id
        refs.append(RecordRef(record_id=record_id, subject=subject,
                              load=functools.partial(load_wfdb, path, root=root),
                              report=report, sentences=sentences))
    return Listing(refs, skipped)
