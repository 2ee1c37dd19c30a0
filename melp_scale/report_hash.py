"""A stable 63-bit hash of a report's normalised text: the key of the multi-positive targets.

Identical reports (MIMIC-like corpora repeat short machine statements such as "sinus rhythm.
normal ecg." many times per batch) get the same hash, so the contrastive losses treat them as
each other's positives instead of negatives (``kernels.infonce_loss(positive_ids=...)``).
The text is what the tokenizer sees (the report, or its sentences joined when the report is
blank), normalised: Unicode NFKC, case-folded, runs of whitespace collapsed, ends stripped.
The hash is BLAKE2b (8 bytes) with the top bit cleared: the same in every process, run and
platform (unlike Python's salted ``hash``), and a non-negative int64.
"""
from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Sequence

_SPACES = re.compile(r"\s+")
_TERMINATORS = (".", "!", "?")  # as melp_scale.text joins sentences


def normalise_report(report: str, sentences: Sequence[str] = ()) -> str:
    """The report (or its sentences, when the report is blank) in the normal form that is hashed."""
    text = report if report and report.strip() else " ".join(
        p if p.endswith(_TERMINATORS) else p + "." for p in (s.strip() for s in sentences) if p)
    return _SPACES.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def report_hash(report: str, sentences: Sequence[str] = ()) -> int:
    """63-bit BLAKE2b hash of :func:`normalise_report` (an int in [0, 2**63))."""
    digest = hashlib.blake2b(normalise_report(report, sentences).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") & (2**63 - 1)
