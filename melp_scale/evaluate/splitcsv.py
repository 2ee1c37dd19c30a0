"""Published split CSVs (the MERL / MELP benchmark files) -> records, 0/1 labels, splits.

Layouts accepted (as distributed with MERL, reused by MELP), one file per split:

| task | file | record columns | class columns |
|---|---|---|---|
| ptbxl-super/-sub/-form/-rhythm | ``ptbxl_<super_class/sub_class/form/rhythm>_<split>.csv`` | ``ecg_id``, ``filename_lr``, ``filename_hr`` | after ``ecg_id, patient_id, strat_fold, filename_lr, filename_hr, <list column>`` |
| cpsc2018 | ``icbeb_<split>.csv`` | ``filename`` (``A6729``; ``ecg_id`` is a renumbering) | after ``patient_id, ecg_id, filename, validation, age, sex, scp_codes`` |
| csn | ``chapman_<split>.csv`` | ``ecg_path`` (``/chapman/WFDBRecords/18/186/JS18048.mat``) | after ``ecg_path, age, diagnose`` |

- **Class columns** are matched to a task's classes by name, never by position (the files
  of one task order their columns differently: ``ptbxl_sub_class_train.csv`` and ``_test.csv``
  do), ignoring case, whitespace, underscores and hyphens: PTB-XL's ``NST_``, ``_AVB``,
  ``ISC_`` match the files' ``NST``, ``AVB``, ``ISC``; a class also matches its aliases
  (``tasks.py``: ``AFIB``, ``VPC``, ``1AVB``, ``CRBBB``, ``CLBBB`` for CPSC2018 ...). A class
  with no column, or with two, is an error naming it.
- **Records** are matched by every candidate column the file has (``filename_hr``,
  ``filename_lr``, ``ecg_path``, ``filename``, ``record``, ``file_name``, ``path``,
  ``record_id``, ``ecg_id``; or ``--record-column``): the column that names the most
  samples of the shard set is used, and named in the results. Names are normalised
  (``record_name``): basename, no extension, no ``_hr``/``_lr``, numbers without leading
  zeros.
- **Refused, with the rows named** (file line numbers): a label that is not 0/1/true/false
  (``1.0``/``0.0`` included), an empty record name, a record twice in one file with
  different labels, a record in two split files. A record repeated with identical labels is
  kept once and counted.

Labels of the published CSN files were derived by their authors by substring matching of
the ``diagnose`` acronyms (a row diagnosed ``AFIB`` is also ``AF``, ``AVB`` also ``VB``,
``STE`` also ``ST``; ``SB`` has no column). With ``--split-csv`` the file's labels are used
as published, so results compare with the papers; derived from the WFDB headers (no split
CSV) they follow the SNOMED codes of ``tasks.py``.
"""
from __future__ import annotations

import os
import re
from typing import Any

import numpy as np
import pandas as pd

from melp_scale.evaluate.tasks import Task, normalise_name

RECORD_COLUMNS = ("filename_hr", "filename_lr", "ecg_path", "filename", "record", "file_name",
                  "path", "record_id", "ecg_id")
TRUE_VALUES = {"1", "1.0", "true"}
FALSE_VALUES = {"0", "0.0", "false"}
MAX_NAMED = 8  # rows named in an error message


def record_name(name: Any) -> str:
    """Normalised record name: basename, no extension, no ``_hr``/``_lr``, int if numeric."""
    base = os.path.basename(str(name).strip().replace("\\", "/"))
    base = re.sub(r"\.(mat|hea|dat|npy|csv)$", "", base, flags=re.IGNORECASE)
    base = re.sub(r"_(hr|lr)$", "", base)
    if re.fullmatch(r"\d+\.0+", base):  # pandas wrote an integer id as float
        base = base.split(".")[0]
    return str(int(base)) if base.isdigit() else base


def _lines(rows) -> str:
    rows = list(rows)
    named = ", ".join(str(int(r) + 2) for r in rows[:MAX_NAMED])  # header is line 1
    return f"line(s) {named}" + (f" and {len(rows) - MAX_NAMED} more" if len(rows) > MAX_NAMED else "")


def class_columns(path: str, columns: list[str], task: Task) -> list[str]:
    """The column of each class of ``task`` (class order), matched by normalised name/alias."""
    by_name: dict[str, list[str]] = {}
    for column in columns:
        by_name.setdefault(normalise_name(column), []).append(column)
    found, missing = [], []
    for cls in task.classes:
        names = dict.fromkeys(normalise_name(n) for n in (cls.name, *cls.aliases))
        matches = [c for n in names for c in by_name.get(n, [])]
        if len(matches) > 1:
            raise ValueError(f"--split-csv {path!r}: class {cls.name} of task {task.name} matches "
                             f"several columns {matches}")
        if not matches:
            missing.append(cls.name)
        else:
            found.append(matches[0])
    if missing:
        raise ValueError(f"--split-csv {path!r}: no column for class(es) {', '.join(missing)} of "
                         f"task {task.name} (columns: {', '.join(map(str, columns))})")
    return found


def _labels(path: str, frame: pd.DataFrame, columns: list[str]) -> np.ndarray:
    """(N, C) uint8 from 0/1/true/false cells; anything else is an error naming rows."""
    out = np.zeros((len(frame), len(columns)), dtype=np.uint8)
    for j, column in enumerate(columns):
        values = frame[column].fillna("").astype(str).str.strip().str.lower()
        positive, negative = values.isin(TRUE_VALUES), values.isin(FALSE_VALUES)
        bad = np.flatnonzero(~(positive | negative).to_numpy())
        if bad.size:
            shown = sorted({repr(v) for v in values.iloc[bad[:MAX_NAMED]]})
            raise ValueError(f"--split-csv {path!r}: column {column!r} has labels that are not "
                             f"0/1/true/false ({', '.join(shown)}) at {_lines(bad)}")
        out[:, j] = positive.to_numpy()
    return out


def read_split_csv(path: str, task: Task, record_column: str | None = None,
                   known: set[str] | None = None) -> pd.DataFrame:
    """A published split CSV -> DataFrame with ``record`` (normalised names), ``line`` (file
    line), one 0/1 column per class of ``task`` in class order; ``attrs["record_column"]``
    names the column used. ``known``: the shard set's record names (picks the record
    column that matches most of them; None: the first candidate present)."""
    if not os.path.isfile(path):
        raise ValueError(f"--split-csv {path!r} does not exist")
    frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    column = _record_column(path, frame, record_column, known)
    records = frame[column].astype(str).str.strip()
    empty = np.flatnonzero((records == "").to_numpy())
    if empty.size:
        raise ValueError(f"--split-csv {path!r}: empty record name in column {column!r} at {_lines(empty)}")
    classes = class_columns(path, list(frame.columns), task)
    out = pd.DataFrame({"record": [record_name(v) for v in records],
                        "line": np.arange(len(frame)) + 2})
    labels = _labels(path, frame, classes)
    for j, cls in enumerate(task.class_names):
        out[cls] = labels[:, j]
    out.attrs["record_column"] = column
    out.attrs["class_columns"] = dict(zip(task.class_names, classes))
    return _drop_repeats(path, out, task)


def _record_column(path: str, frame: pd.DataFrame, record_column: str | None,
                   known: set[str] | None) -> str:
    if record_column:
        if record_column not in frame.columns:
            raise ValueError(f"--record-column {record_column!r} is not a column of {path!r} "
                             f"(columns: {', '.join(map(str, frame.columns))})")
        return record_column
    lowered = {str(c).strip().lower(): c for c in frame.columns}
    candidates = [lowered[c] for c in RECORD_COLUMNS if c in lowered]
    if not candidates:
        raise ValueError(f"--split-csv {path!r}: no record column (looked for "
                         f"{', '.join(RECORD_COLUMNS)}); set --record-column")
    if known is None:
        return candidates[0]
    hits = [sum(record_name(v) in known for v in frame[c]) for c in candidates]
    return candidates[int(np.argmax(hits))]  # first of the best: the preference order


def _drop_repeats(path: str, frame: pd.DataFrame, task: Task) -> pd.DataFrame:
    """Keep one row per record; a record repeated with other labels is an error."""
    repeated = frame[frame.duplicated("record", keep=False)]
    if repeated.empty:
        frame.attrs["repeated_rows"] = 0
        return frame
    conflicts = []
    for record, group in repeated.groupby("record", sort=False):
        if len(group[task.class_names].drop_duplicates()) > 1:
            conflicts.append(f"{record} (lines {', '.join(map(str, group['line']))})")
    if conflicts:
        raise ValueError(f"--split-csv {path!r}: record(s) listed twice with different labels: "
                         f"{'; '.join(conflicts[:MAX_NAMED])}"
                         + (f" and {len(conflicts) - MAX_NAMED} more" if len(conflicts) > MAX_NAMED else ""))
    attrs = dict(frame.attrs)
    kept = frame.drop_duplicates("record").reset_index(drop=True)
    kept.attrs.update(attrs, repeated_rows=len(frame) - len(kept))
    return kept


def read_split_files(split_csvs: dict[str, str], task: Task, record_column: str | None,
                     known: set[str]) -> dict[str, pd.DataFrame]:
    """Every split's file read; a record in two split files is an error naming both."""
    frames = {split: read_split_csv(path, task, record_column, known)
              for split, path in sorted(split_csvs.items())}
    seen: dict[str, tuple[str, int]] = {}
    clashes = []
    for split, frame in frames.items():
        for record, line in zip(frame["record"], frame["line"]):
            if record in seen and seen[record][0] != split:
                other, other_line = seen[record]
                clashes.append(f"{record} ({split_csvs[other]} line {other_line}, "
                               f"{split_csvs[split]} line {line})")
            seen.setdefault(record, (split, int(line)))
    if clashes:
        raise ValueError(f"--split-csv: {len(clashes)} record(s) in two splits: "
                         f"{'; '.join(clashes[:MAX_NAMED])}"
                         + (f" and {len(clashes) - MAX_NAMED} more" if len(clashes) > MAX_NAMED else ""))
    return frames
