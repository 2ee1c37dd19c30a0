"""Command line: ``python -m melp_scale.shard {build,verify,inspect,dedupe}``."""
from __future__ import annotations

import argparse
import os
import sys

from melp_scale.shard.preprocess import SignalConfig
from melp_scale.shard.sources import SOURCE_NAMES, SourceOptions

# The tiny synthetic demo set: smaller shards (so it has several to stream) and a val split
# large enough to report retrieval on.
SOURCE_SHARD_SIZE = {"synthetic": 48}
SOURCE_VAL_FRACTION = {"synthetic": 0.125}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m melp_scale.shard", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="turn a raw ECG corpus into WebDataset shards")
    build.add_argument("--source", required=True, help=f"one of: {', '.join(SOURCE_NAMES)}")
    build.add_argument("--root", help="the dataset folder (all sources but synthetic)")
    build.add_argument("--out", required=True, help="output folder, e.g. shards/mimic")
    build.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    build.add_argument("--val-fraction", type=float,
                       help="share of subjects in val (default 0.02; synthetic 0.125)")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--exclude", help="file of record ids (one per line) to leave out")
    build.add_argument("--shard-size", type=int, help="records per shard (default 1000; synthetic 64)")
    build.add_argument("--min-words", type=int, help="minimum report words (default 4 for text sources)")
    build.add_argument("--allow-foreign-out", action="store_true",
                       help="build into an --out that holds files the builder did not write")
    signal = build.add_argument_group("signal")
    defaults = SignalConfig()
    signal.add_argument("--fs", type=int, default=defaults.fs, help="target sampling rate (Hz)")
    signal.add_argument("--seconds", type=float, default=defaults.seconds, help="window length (s)")
    signal.add_argument("--all-windows", action="store_true", help="every window of longer records")
    signal.add_argument("--gain", type=float, default=defaults.gain, help="int16 units per mV")
    signal.add_argument("--on-short", default=defaults.on_short, choices=("pad", "skip"))
    signal.add_argument("--on-nan", default=defaults.on_nan, choices=("skip", "repair"))
    signal.add_argument("--on-missing-lead", default=defaults.on_missing_lead, choices=("skip", "zero"))
    signal.add_argument("--on-flat-lead", default=defaults.on_flat_lead, choices=("skip", "keep"))
    source = build.add_argument_group("source options")
    source.add_argument("--reports", help="wfdb-dir: CSV with columns record, report[, subject]")
    source.add_argument("--dx-mapping", action="append", default=[],
                        help="challenge: a scoring table CSV (SNOMED code -> name); repeatable")
    source.add_argument("--ptbxl-rate", type=int, default=500, choices=(100, 500))
    source.add_argument("--count", type=int, default=192, help="synthetic: number of records")
    verify = commands.add_parser("verify", help="check a shard set against its manifest")
    verify.add_argument("dir")
    inspect = commands.add_parser("inspect", help="summarise a shard set, or plot one sample")
    inspect.add_argument("dir")
    inspect.add_argument("--plot", metavar="KEY", help="sample key to draw as a 12-lead chart")
    inspect.add_argument("--to", default="sample.png", help="PNG path for --plot")
    dedupe = commands.add_parser("dedupe", help="find records present in two shard sets "
                                 "(melp_scale.shard.dedupe) and write an exclusion list")
    dedupe.add_argument("sets", nargs="+", help="shard sets (folders or URLs); earlier ones keep their copy")
    dedupe.add_argument("--exclude-eval", nargs="*", default=[], metavar="EVAL_SHARDS",
                        help="evaluation shard sets: every training record matching one is excluded")
    dedupe.add_argument("--out", default="exclusions.json", help="the exclusion list to write")
    return parser


def _dedupe(args: argparse.Namespace) -> int:
    from melp_scale.shard.dedupe import run_dedupe

    print(run_dedupe(args.sets, args.exclude_eval, args.out))
    return 0


def _build(args: argparse.Namespace) -> int:
    from melp_scale.shard.build import BuildConfig, run_build

    config = BuildConfig(
        source=args.source, root=args.root, out=args.out, val_fraction=(args.val_fraction if args.val_fraction is not None
                                         else SOURCE_VAL_FRACTION.get(args.source, 0.02)),
        seed=args.seed, exclude=args.exclude, workers=args.workers, min_words=args.min_words,
        allow_foreign_out=args.allow_foreign_out,
        shard_size=args.shard_size or SOURCE_SHARD_SIZE.get(args.source, 1000),
        signal=SignalConfig(fs=args.fs, seconds=args.seconds, all_windows=args.all_windows,
                            gain=args.gain, on_short=args.on_short, on_nan=args.on_nan,
                            on_missing_lead=args.on_missing_lead, on_flat_lead=args.on_flat_lead),
        options=SourceOptions(reports=args.reports, dx_mapping=tuple(args.dx_mapping),
                              ptbxl_rate=args.ptbxl_rate, count=args.count, seed=args.seed))
    manifest = run_build(config)
    from melp_scale.shard.verify import summary

    counts = manifest["counts"]
    print(summary(args.out))
    print(f"\n{len(manifest['shards'])} shards ({manifest['reused_shards']} kept from an earlier run) "
          f"in {manifest['elapsed_s']:.1f} s, {counts['listed'] / max(manifest['elapsed_s'], 1e-9):.1f} "
          f"records/s with {args.workers} worker(s)")
    reasons = manifest["skipped_records"][:5]
    if reasons:
        print("first skipped records (all are in manifest.json 'skipped_records'):")
        for item in reasons:
            print(f"  {item['record_id']}: {item['reason']} {item['detail']}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from melp_scale.shard.verify import read_manifest, verify

    faults = verify(args.dir)
    manifest = read_manifest(args.dir)
    for fault in faults:
        print(f"FAULT {fault}")
    total = sum(e["num_samples"] for e in manifest["shards"])
    print(f"{args.dir}: {len(manifest['shards'])} shards, {total} samples, "
          + (f"{len(faults)} fault(s)" if faults else "all verified"))
    return 1 if faults else 0


def _inspect(args: argparse.Namespace) -> int:
    from melp_scale.shard.verify import find_sample, summary

    if not args.plot:
        print(summary(args.dir))
        return 0
    from melp_scale.shard.plot import plot_12lead

    ecg, meta, report = find_sample(args.dir, args.plot)
    title = f"{args.plot} ({meta['source']} {meta['record_id']}): {report[:120]}"
    plot_12lead(ecg / meta["gain"], meta["fs"], title, args.to)
    print(f"wrote {args.to}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"build": _build, "verify": _verify, "inspect": _inspect,
                "dedupe": _dedupe}[args.command](args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a read-only or full disk, a path through a file, ...
        print(f"error: cannot read or write {error.filename or ''}: {error.strerror or error}",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
