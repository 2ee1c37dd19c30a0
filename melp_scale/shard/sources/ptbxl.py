"""PTB-XL: ``ptbxl_database.csv`` (free-text ``report``, ``scp_codes``) + ``scp_statements.csv``.

Labels follow the PTB-XL benchmark (Strodthoff et al. 2020): every code in ``scp_codes``
(whatever its likelihood) that ``scp_statements.csv`` marks diagnostic maps to its
``diagnostic_class`` (super) and ``diagnostic_subclass`` (sub); codes marked form / rhythm
give the form / rhythm labels. ``strat_fold`` is kept (folds 1-8 train, 9 val, 10 test).
"""
from __future__ import annotations

import ast
import functools
import os

import pandas as pd

from melp_scale.shard.preprocess import clean_report, split_free_text
from melp_scale.shard.record import RecordRef
from melp_scale.shard.sources import Listing, SourceOptions, inside_root, require_file
from melp_scale.shard.sources.wfdb_io import load_wfdb


def ptbxl_labels(scp_codes: dict[str, float], statements: pd.DataFrame) -> dict[str, list[str]]:
    """Benchmark label sets for one record's ``scp_codes``."""
    known = [code for code in scp_codes if code in statements.index]
    rows = statements.loc[known]

    def pick(mask_column: str, value_column: str | None = None) -> list[str]:
        chosen = rows[rows[mask_column] == 1.0]
        values = chosen.index if value_column is None else chosen[value_column].dropna()
        return sorted(set(str(v) for v in values))

    return {"ptbxl_super": pick("diagnostic", "diagnostic_class"),
            "ptbxl_sub": pick("diagnostic", "diagnostic_subclass"),
            "ptbxl_form": pick("form"), "ptbxl_rhythm": pick("rhythm")}


def list_records(root: str, options: SourceOptions) -> Listing:
    if options.ptbxl_rate not in (100, 500):
        raise ValueError(f"--ptbxl-rate must be 100 or 500, got {options.ptbxl_rate}")
    database = pd.read_csv(require_file(root, "ptbxl_database.csv"))
    statements = pd.read_csv(require_file(root, "scp_statements.csv"), index_col=0)
    column = "filename_hr" if options.ptbxl_rate == 500 else "filename_lr"
    refs, skipped = [], []
    for row in database.itertuples(index=False):
        record_id = str(int(row.ecg_id))
        try:
            scp_codes = ast.literal_eval(row.scp_codes)
        except (ValueError, SyntaxError):
            skipped.append((record_id, "bad_labels", f"scp_codes {row.scp_codes!r}"))
            continue
        text = row.report if isinstance(row.report, str) else ""
        report, sentences = clean_report(split_free_text(text))
        if not report:
            skipped.append((record_id, "no_report", "empty report column"))
            continue
        labels = ptbxl_labels(scp_codes, statements)
        labels["scp_codes"] = {str(k): float(v) for k, v in scp_codes.items()}
        subject = str(int(row.patient_id)) if pd.notna(row.patient_id) else record_id
        path = os.path.join(root, str(getattr(row, column)))
        if not inside_root(root, path + ".hea"):
            skipped.append((record_id, "outside_root", f"{column} resolves outside --root"))
            continue
        refs.append(RecordRef(
            record_id=record_id, subject=subject,
            load=functools.partial(load_wfdb, path, root=root),
            report=report, sentences=sentences, labels=labels,
            meta={"strat_fold": int(row.strat_fold), "age": _number(row.age), "sex": _number(row.sex)}))
    return Listing(refs, skipped)


def _number(value: object) -> float | None:
    return None if pd.isna(value) else float(value)
