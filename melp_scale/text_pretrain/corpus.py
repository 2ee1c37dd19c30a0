"""The stage-1 corpus: documents -> de-duplicated -> train/validation split -> packed sequences.

Sources, read in this order (so the result is deterministic):

1. shard folders: the clean report (``KEY.txt``) of every sample in the manifest's shards with
   ``split == "train"`` only. The shard builder splits by patient and leaves evaluation records
   out (``--exclude``), so validation and evaluation reports never reach the corpus; records
   named in ``corpus.exclude`` / ``corpus.exclude_file`` (record id or sample key) are dropped too;
2. the sample cardiology corpus shipped with the package (``corpus.sample_corpus``);
3. ``corpus.texts``: ``.jsonl`` files (one JSON object a line, the document in
   ``corpus.jsonl_field``), other files (one document a non-empty line), and folders (every
   ``.txt`` below them, sorted, one document a file).

Documents are stripped, dropped when shorter than ``min_chars``, de-duplicated by the sha256 of
their exact text (first occurrence kept), then split into train/validation documents by a
permutation seeded with ``seed``: no document is on both sides.

Packing (RoBERTa's "full sentences"): a split's documents are tokenized without special tokens
and concatenated with ``[SEP]`` between documents, then cut into rows of ``max_length - 2``
tokens, each ``[CLS] tokens [SEP]``; the last row is right-padded.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import tarfile
from typing import Any, Iterator

import numpy as np
import torch

from melp_scale.stream import load_shard_set
from melp_scale.text_pretrain.config import CorpusConfig

SAMPLE_CORPUS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets",
                             "cardiology_corpus.txt")


@dataclasses.dataclass
class CorpusStats:
    """What building the corpus kept and dropped."""

    read: dict[str, int] = dataclasses.field(default_factory=dict)  # documents read per source
    excluded: int = 0  # shard reports dropped by corpus.exclude / exclude_file
    too_short: int = 0  # documents under min_chars
    duplicates: int = 0  # documents whose exact text came earlier
    train_documents: int = 0
    val_documents: int = 0


# ----------------------------------------------------------------------------- sources


def shard_reports(directory: str, exclude: set[str]) -> Iterator[tuple[str, str, str]]:
    """``(key, record_id, report)`` of every sample in the train-split shards of ``directory``
    whose key and record id are not in ``exclude``."""
    shard_set = load_shard_set(directory, "train")
    for name in shard_set.names:
        with tarfile.open(os.path.join(directory, name), mode="r:") as tar:
            record_ids: dict[str, str] = {}
            for member in tar:
                key, _, kind = member.name.partition(".")
                if kind == "json":
                    record_ids[key] = str(json.load(tar.extractfile(member)).get("record_id", ""))
                elif kind == "txt":
                    record_id = record_ids.pop(key, "")
                    if key not in exclude and record_id not in exclude:
                        yield key, record_id, tar.extractfile(member).read().decode("utf-8")


def _count_shard_samples(directory: str) -> int:
    return load_shard_set(directory, "train").num_samples


def text_documents(path: str, jsonl_field: str) -> Iterator[str]:
    """The documents of a ``.jsonl`` file, a text file (a line each) or a folder (a .txt each)."""
    if os.path.isdir(path):
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(f for f in files if f.endswith(".txt")):
                with open(os.path.join(root, name), encoding="utf-8") as handle:
                    yield handle.read()
        return
    if not os.path.isfile(path):
        raise ValueError(f"corpus.texts: {path!r} is neither a file nor a folder")
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            if not path.endswith(".jsonl"):
                yield line
                continue
            record = json.loads(line)
            if not isinstance(record.get(jsonl_field), str):
                raise ValueError(f"{path}:{number}: no string field {jsonl_field!r} "
                                 f"(corpus.jsonl_field)")
            yield record[jsonl_field]


def read_exclusions(config: CorpusConfig) -> set[str]:
    """``corpus.exclude`` plus the lines of ``corpus.exclude_file``."""
    exclude = {str(e) for e in config.exclude}
    if config.exclude_file and config.exclude_file.endswith(".json"):  # a dedupe exclusion list
        from melp_scale.shard.dedupe import excluded_keys

        return exclude | excluded_keys(config.exclude_file)
    if config.exclude_file:
        if not os.path.isfile(config.exclude_file):
            raise ValueError(f"corpus.exclude_file {config.exclude_file!r} does not exist")
        with open(config.exclude_file, encoding="utf-8") as handle:
            exclude |= {line.strip() for line in handle if line.strip()}
    return exclude


def collect_documents(config: CorpusConfig) -> tuple[list[str], CorpusStats]:
    """Every source's documents, stripped, filtered and de-duplicated (module docstring)."""
    exclude, stats = read_exclusions(config), CorpusStats()
    sources: list[tuple[str, Iterator[str]]] = []
    for directory in config.shards:
        if not os.path.isfile(os.path.join(directory, "manifest.json")):
            raise ValueError(f"corpus.shards: {directory!r} has no manifest.json")
        sources.append((directory, (report for _, _, report in shard_reports(directory, exclude))))
    if config.sample_corpus:
        sources.append(("sample_corpus", text_documents(SAMPLE_CORPUS, config.jsonl_field)))
    sources += [(path, text_documents(path, config.jsonl_field)) for path in config.texts]
    seen: set[bytes] = set()
    documents: list[str] = []
    for name, texts in sources:
        stats.read[name] = 0
        for text in texts:
            stats.read[name] += 1
            text = text.strip()
            if len(text) < config.min_chars:
                stats.too_short += 1
                continue
            digest = hashlib.sha256(text.encode("utf-8")).digest()
            if digest in seen:
                stats.duplicates += 1
                continue
            seen.add(digest)
            documents.append(text)
    stats.excluded = sum(_count_shard_samples(d) for d in config.shards) - sum(
        stats.read[d] for d in config.shards)
    return documents, stats


def split_documents(documents: list[str], val_fraction: float, seed: int
                    ) -> tuple[list[str], list[str]]:
    """(train, validation) documents: a seeded permutation's first ``val_fraction`` is held out
    (at least one document when the fraction is positive and there are two or more)."""
    num_val = round(len(documents) * val_fraction)
    if val_fraction > 0 and len(documents) >= 2:
        num_val = min(max(num_val, 1), len(documents) - 1)
    order = np.random.default_rng([seed, 1]).permutation(len(documents))
    held_out = set(order[:num_val].tolist())
    train = [d for i, d in enumerate(documents) if i not in held_out]
    val = [d for i, d in enumerate(documents) if i in held_out]
    if not train:
        raise ValueError("the corpus has no training document: add text (corpus.texts, "
                         "corpus.shards) or lower corpus.min_chars")
    return train, val


# ----------------------------------------------------------------------------- tokenizer


def mine_domain_tokens(tokenizer: Any, documents: list[str], count: int, min_count: int,
                       min_pieces: int) -> list[str]:
    """The ``count`` corpus words that save the most tokens when added whole: alphabetic words
    of 4+ characters seen ``min_count`` times that the tokenizer splits into ``min_pieces`` or
    more pieces, ranked by occurrences x (pieces - 1), ties by the word."""
    if count == 0:
        return []
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("model.num_domain_tokens needs a fast (Rust) tokenizer; list the words "
                         "in model.domain_tokens instead")
    backend = tokenizer.backend_tokenizer
    counts: collections.Counter[str] = collections.Counter()
    for document in documents:
        text = backend.normalizer.normalize_str(document) if backend.normalizer else document
        words = backend.pre_tokenizer.pre_tokenize_str(text) if backend.pre_tokenizer else []
        counts.update(w for w, _ in words if w.isalpha() and len(w) >= 4)
    candidates = sorted(w for w, c in counts.items() if c >= min_count)
    if not candidates:
        return []
    # through the HF wrapper: the backend may carry a tokenizer.json's padding settings
    pieces = [len(ids) for ids in tokenizer(candidates, add_special_tokens=False)["input_ids"]]
    ranked = sorted((-counts[w] * (p - 1), w) for w, p in zip(candidates, pieces) if p >= min_pieces)
    return [w for _, w in ranked[:count]]


def add_domain_tokens(tokenizer: Any, words: list[str]) -> list[str]:
    """Add ``words`` (normalised as the tokenizer normalises text) as whole-word tokens; return
    the ones that were new, in order."""
    from tokenizers import AddedToken

    normalizer = tokenizer.backend_tokenizer.normalizer if getattr(tokenizer, "is_fast", False) else None
    vocab = tokenizer.get_vocab()
    new: list[str] = []
    for word in words:
        word = normalizer.normalize_str(word.strip()) if normalizer else word.strip()
        if word not in vocab and word not in new:
            new.append(word)
    tokenizer.add_tokens([AddedToken(w, single_word=True, normalized=True) for w in new])
    return new


# ----------------------------------------------------------------------------- packing


def pack_documents(tokenizer: Any, documents: list[str], max_length: int) -> torch.Tensor:
    """(N, max_length) int32 rows ``[CLS] tokens [SEP] pad...`` (module docstring)."""
    cls_id, sep_id, pad_id = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
    if None in (cls_id, sep_id, pad_id, tokenizer.mask_token_id):
        raise ValueError("model.name_or_path: the tokenizer lacks a [CLS], [SEP], [PAD] or [MASK] "
                         "token; choose a BERT-family model")
    if not documents:
        return torch.zeros(0, max_length, dtype=torch.int32)
    encoded = tokenizer(documents, add_special_tokens=False)["input_ids"]
    # documents joined by [SEP] (no trailing one: every row ends with its own [SEP])
    stream = np.fromiter((t for ids in encoded for t in (*ids, sep_id)), dtype=np.int64)[:-1]
    body = max_length - 2
    num_rows = -(-len(stream) // body)
    rows = np.full((num_rows, max_length), pad_id, dtype=np.int64)
    padded = np.full(num_rows * body, pad_id, dtype=np.int64)
    padded[:len(stream)] = stream
    rows[:, 1:-1] = padded.reshape(num_rows, body)
    rows[:, 0] = cls_id
    lengths = np.minimum(len(stream) - np.arange(num_rows) * body, body)  # real tokens per row
    rows[np.arange(num_rows), lengths + 1] = sep_id
    return torch.from_numpy(rows.astype(np.int32))
