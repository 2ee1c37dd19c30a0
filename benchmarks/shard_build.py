"""Shard builder throughput: records/s with 1 worker and with all workers, beside plain reading.

Plain reading is ``wfdb.rdrecord`` of the same records and nothing else (no preprocessing,
no writing): the ratio says what the builder's resampling, checks and tar writing cost on
top of the unavoidable I/O. By default it runs on a generated WFDB folder (500 Hz, 10 s,
12 leads); ``--root DIR`` measures a real one (any layout ``wfdb-dir`` reads).

    python benchmarks/shard_build.py [--records 400] [--root DIR] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
import wfdb

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import environment  # noqa: E402
from melp_scale.shard.build import BuildConfig, run_build  # noqa: E402
from melp_scale.shard.sources import find_headers  # noqa: E402

LEADS = ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]


def make_tree(root: str, num_records: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    t = np.arange(5000) / 500
    for number in range(num_records):
        folder = os.path.join(root, f"p{number // 100:03d}")
        os.makedirs(folder, exist_ok=True)
        signal = (np.sin(2 * np.pi * rng.uniform(0.8, 2.0, 12) * t[:, None])
                  + rng.normal(0, 0.05, (5000, 12)))
        wfdb.wrsamp(f"r{number:06d}", fs=500, units=["mV"] * 12, sig_name=LEADS, p_signal=signal,
                    fmt=["16"] * 12, adc_gain=[200] * 12, baseline=[0] * 12, write_dir=folder)


def time_reading(root: str) -> float:
    start = time.perf_counter()
    for path in find_headers(root):
        wfdb.rdrecord(path)
    return time.perf_counter() - start


def time_build(root: str, workers: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        run_build(BuildConfig(source="wfdb-dir", root=root, out=out, workers=workers,
                              shard_size=100, val_fraction=0.0))
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", help="a WFDB folder to measure (default: a generated one)")
    parser.add_argument("--records", type=int, default=400, help="records in the generated folder")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = args.root or scratch
        if not args.root:
            make_tree(root, args.records)
        num_records = len(find_headers(root))
        all_workers = os.cpu_count() or 1
        rows = {"wfdb.rdrecord (read only)": lambda: time_reading(root),
                "build, 1 worker": lambda: time_build(root, 1),
                f"build, {all_workers} workers": lambda: time_build(root, all_workers)}
        results = {}
        for name, run in rows.items():
            seconds = [run() for _ in range(args.repeats)]
            results[name] = {"median_s": statistics.median(seconds), "all_s": seconds,
                             "records_per_s": num_records / statistics.median(seconds)}
    base = results["wfdb.rdrecord (read only)"]["records_per_s"]
    print(f"{num_records} records, median of {args.repeats} runs, {all_workers} CPU cores")
    print(f"{'':<28}{'records/s':>12}{'vs read':>10}")
    for name, row in results.items():
        row["ratio_vs_read"] = row["records_per_s"] / base
        print(f"{name:<28}{row['records_per_s']:>12.1f}{row['ratio_vs_read']:>10.2f}")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"shard_build-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as handle:
        json.dump({"benchmark": "shard_build", "environment": environment(torch.device("cpu")),
                   "cpu_count": all_workers, "wfdb": wfdb.__version__,
                   "num_records": num_records, "generated": not args.root,
                   "results": results}, handle, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
