"""PhysioNet/CinC Challenge 2020/2021 records: ``.hea`` + MATLAB v4 ``.mat``, ``#Dx:`` codes.

Labels are the ``#Dx`` codes as written (SNOMED CT codes, or CPSC2018's own abbreviations);
names come from the Challenge scoring tables passed with ``--dx-mapping`` (columns ``Dx``,
``SNOMEDCTCode`` or ``SNOMED CT Code``, ``Abbreviation``) and, for CPSC2018's abbreviations,
from the CPSC2018 class list. Headers are parsed by hand so the old Georgia headers whose
record name reads ``Exxxxx.mat`` (which wfdb refuses) load as well.
"""
from __future__ import annotations

import functools
import os

import pandas as pd

from melp_scale.shard.record import RecordRef, SkipRecord
from melp_scale.shard.sources import Listing, SourceOptions, find_headers, require_inside
from melp_scale.shard.sources.wfdb_io import load_challenge, parse_header

# The nine CPSC2018 classes (China Physiological Signal Challenge 2018 description).
CPSC2018_NAMES = {
    "Normal": "normal", "AF": "atrial fibrillation", "I-AVB": "first degree av block",
    "LBBB": "left bundle branch block", "RBBB": "right bundle branch block",
    "PAC": "premature atrial contraction", "PVC": "premature ventricular contraction",
    "STD": "st depression", "STE": "st elevation",
}


def read_dx_tables(paths: tuple[str, ...]) -> dict[str, tuple[str, str]]:
    """SNOMED code -> (name, abbreviation) from Challenge scoring tables; later files win."""
    table: dict[str, tuple[str, str]] = {}
    for path in paths:
        if not os.path.isfile(path):
            raise ValueError(f"--dx-mapping {path!r} does not exist")
        frame = pd.read_csv(path, dtype=str)
        code_column = next((c for c in ("SNOMEDCTCode", "SNOMED CT Code") if c in frame), None)
        if code_column is None or "Dx" not in frame:
            raise ValueError(f"--dx-mapping {path!r} lacks Dx / SNOMED code columns")
        for code, name, abbreviation in zip(frame[code_column], frame["Dx"],
                                             frame.get("Abbreviation", frame["Dx"])):
            table[str(code).strip()] = (str(name).strip(), str(abbreviation).strip())
    return table


def list_records(root: str, options: SourceOptions) -> Listing:
    mapping = read_dx_tables(options.dx_mapping)
    refs, skipped = [], []
    for path in find_headers(root):
        record_id = os.path.basename(path)
        try:
            require_inside(root, path + ".hea")
            header = parse_header(path + ".hea")
        except SkipRecord as skip:
            skipped.append((record_id, skip.reason, skip.detail))
            continue
        comments = header["comments"]
        codes = [code.strip() for code in comments.get("Dx", "").split(",") if code.strip()]
        names = [mapping[c][0] if c in mapping else CPSC2018_NAMES.get(c, "") for c in codes]
        abbreviations = [mapping[c][1] if c in mapping else c for c in codes]
        refs.append(RecordRef(
            record_id=record_id, subject=record_id,
            load=functools.partial(load_challenge, path, root=root),
            labels={"dx": codes, "dx_names": names, "dx_abbrev": abbreviations},
            meta={"dataset_folder": os.path.relpath(os.path.dirname(path), root),
                  "age": comments.get("Age"), "sex": comments.get("Sex")}))
    return Listing(refs, skipped)
