"""Several shard sets mixed by weight into one epoch plan (``StreamConfig.sources``).

``sources: [{shards: shards/mimic, weight: 0.7}, {shards: "https://host/ptbxl/", weight: 0.3}]``
(``name`` optional; each ``shards`` is a folder or URLs as in ``melp_scale.remote``):

1. Counts: an epoch has N samples, the sources' sizes summed (one pass of the data in volume).
   Source i gets ``n_i = N * w_i / sum(w)`` samples, rounded by largest remainder (ties to the
   earlier source): exact shares, the same on every rank, in every epoch and run.
2. Which samples: source i is read as an endless stream of its own passes (pass j: its shards
   permuted by ``(seed, j, i + 1)``, samples in file order, excluded samples left out); mixed
   epoch e takes positions ``[e * n_i, (e + 1) * n_i)`` of it. A down-weighted source goes on
   where the last epoch stopped; an up-weighted one wraps into its next pass.
3. Interleaving: the k-th of source i's ``n_i`` samples sits at ``(k + 0.5) / n_i`` of the epoch;
   merging by that position spreads every source evenly, so each shuffle window (and so each
   logged step window) holds the weights' shares to within a sample or two per source.
4. The rest is ``melp_scale.remote``'s plan over a flat list of pairs, unchanged: equal batches
   per rank, windows, repeats, workers, exact resume, local or streamed reading.
5. Counts per source: batches carry ``source_index``; ``StreamLoader`` pops it and sums it, and
   ``StreamLoader.take_source_counts()`` hands the trainer ``source_samples/<name>`` per step
   window.

Validation (any split but "train") ignores the weights: each source's split exactly once.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import numpy as np

from melp_scale.remote import PlannedShardSet, _pairs, load_set


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """One entry of ``data.sources``."""

    shards: str | list[str]  # a folder, a URL / brace pattern, or a list of URLs
    weight: float = 1.0  # relative share of each epoch's samples
    name: str = ""  # a label for logs and counts; default: the folder's or URL's last part

    def __post_init__(self) -> None:
        if not (isinstance(self.weight, (int, float)) and self.weight >= 0):
            raise ValueError(f"data.sources: weight of {self.shards!r} must be a number >= 0, "
                             f"got {self.weight!r}")


def parse_sources(sources: Sequence[dict[str, Any] | SourceSpec]) -> list[SourceSpec]:
    specs = []
    for number, item in enumerate(sources):
        if isinstance(item, dict):
            unknown = set(item) - {"shards", "weight", "name"}
            if "shards" not in item or unknown:
                raise ValueError(f"data.sources[{number}] needs 'shards' (and optional 'weight', "
                                 f"'name'); got keys {sorted(item)}")
            item = SourceSpec(**item)
        specs.append(item)
    if not specs or sum(s.weight for s in specs) <= 0:
        raise ValueError("data.sources: list at least one source with a positive weight")
    names = [s.name or _default_name(s.shards, i) for i, s in enumerate(specs)]
    if len(set(names)) != len(names):
        raise ValueError(f"data.sources: names {names} repeat: give each source a 'name'")
    return [dataclasses.replace(s, name=n) for s, n in zip(specs, names)]


def _default_name(shards: str | list[str], number: int) -> str:
    first = shards if isinstance(shards, str) else (shards[0] if shards else "")
    base = os.path.basename(first.rstrip("/"))
    if "{" in base or base.endswith(".tar") or not base:
        base = os.path.basename(os.path.dirname(first.rstrip("/"))) or f"source{number}"
    return base


def quotas(total: int, weights: Sequence[float]) -> np.ndarray:
    """``total`` split by ``weights``: floor of each share, then one more for the largest
    remainders (earlier sources first on ties); sums to ``total``."""
    shares = np.asarray(weights, dtype=np.float64) / float(sum(weights)) * total
    counts = np.floor(shares).astype(np.int64)
    order = np.lexsort((np.arange(len(shares)), -(shares - counts)))
    counts[order[:total - int(counts.sum())]] += 1
    return counts


@dataclasses.dataclass(frozen=True)
class MixedShardSet(PlannedShardSet):
    """Several sources' shards as one set; the epoch's pairs are mixed by weight."""

    weights: tuple[float, ...] = ()  # per source; () reads each source once (validation)

    def source_sizes(self) -> np.ndarray:
        sizes = np.zeros(len(self.source_names), np.int64)
        for shard, source in enumerate(self.source_of):
            kept = self.kept[shard]
            sizes[source] += self.sizes[shard] if kept is None else len(kept)
        return sizes

    def epoch_counts(self) -> np.ndarray:
        """Samples each source contributes to an epoch (module docstring, step 1)."""
        sizes = self.source_sizes()
        return quotas(int(sizes.sum()), self.weights) if self.weights else sizes

    def epoch_pairs(self, seed: int, epoch: int, shuffle: bool) -> tuple[np.ndarray, np.ndarray]:
        sizes, counts = self.source_sizes(), self.epoch_counts()
        source_of = np.asarray(self.source_of)
        shards, indices, keys, sources = [], [], [], []
        for source, (size, count) in enumerate(zip(sizes.tolist(), counts.tolist())):
            if count == 0:
                continue
            if size == 0:
                raise ValueError(f"data.sources: {self.source_names[source]} has no sample left "
                                 "in this split but a positive weight")
            mine = np.flatnonzero(source_of == source)
            start, stop = epoch * count, (epoch + 1) * count
            for one_pass in range(start // size, (stop - 1) // size + 1):  # step 2
                order = (mine[np.random.default_rng([seed, one_pass, source + 1]).permutation(len(mine))]
                         if shuffle else mine)
                shard, index = _pairs(order, self.sizes, self.kept)
                low, high = max(start - one_pass * size, 0), min(stop - one_pass * size, size)
                shards.append(shard[low:high])
                indices.append(index[low:high])
            keys.append((np.arange(count) + 0.5) / count)  # step 3
            sources.append(np.full(count, source))
        merge = np.lexsort((np.concatenate(sources), np.concatenate(keys)))
        return np.concatenate(shards)[merge], np.concatenate(indices)[merge]


def load_mixed_set(sources: Sequence[dict[str, Any] | SourceSpec], split: str,
                   exclude: str | None = None, weighted: bool = True, verify: bool = False,
                   rank: int = 0, world_size: int = 1) -> MixedShardSet:
    """The split of every source, less excluded samples, as one :class:`MixedShardSet`."""
    specs = parse_sources(sources)
    sets = [load_set(spec.shards, split, exclude, verify, rank, world_size) for spec in specs]
    lengths = {spec.name: s.settings.get("num_samples") for spec, s in zip(specs, sets)}
    if len({v for v in lengths.values() if v is not None}) > 1:
        raise ValueError(f"data.sources: samples of different lengths {lengths}: rebuild with one "
                         "--seconds/--fs or set StreamConfig.crop_samples")
    names, sizes, locations, kept, source_of = [], [], [], [], []
    for number, (spec, shard_set) in enumerate(zip(specs, sets)):
        names += [f"{spec.name}/{name}" for name in shard_set.names]
        sizes += shard_set.sizes
        locations += shard_set.locations
        kept += shard_set.kept
        source_of += [number] * len(shard_set.names)
    return MixedShardSet("+".join(s.name for s in specs), tuple(names), tuple(sizes),
                         sets[0].settings, locations=tuple(locations), kept=tuple(kept),
                         source_of=tuple(source_of), source_names=tuple(s.name for s in specs),
                         weights=tuple(float(s.weight) for s in specs) if weighted else ())
