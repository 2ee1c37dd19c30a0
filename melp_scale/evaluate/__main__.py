"""``python -m melp_scale.evaluate``: zero-shot, linear probe, retrieval, report generation.

    python -m melp_scale.evaluate zeroshot --checkpoint runs/demo/export --data shards/ptbxl
    python -m melp_scale.evaluate linear-probe --checkpoint DIR --data DIR --task cpsc2018 \\
        --fractions 0.01 0.1 1.0
    python -m melp_scale.evaluate zeroshot --checkpoint DIR --data shards/ptbxl --task ptbxl-super \\
        --split-csv test=ptbxl_super_class_test.csv
    python -m melp_scale.evaluate retrieval --checkpoint DIR --data shards/demo --split val
    python -m melp_scale.evaluate caption --checkpoint DIR --data shards/demo --max-samples 32
    python -m melp_scale.evaluate --all --checkpoint DIR --data DIR     # every task, one table
    python -m melp_scale.evaluate tasks                                # the task registry
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from melp_scale.evaluate.caption import CaptionConfig
from melp_scale.evaluate.data import DataConfig
from melp_scale.evaluate.linear_probe import ProbeConfig
from melp_scale.evaluate.runner import KINDS, RunConfig

COMMANDS = (*KINDS, "all", "tasks")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m melp_scale.evaluate",
                                     description="Evaluate a MELP checkpoint on labelled shards")
    parser.add_argument("command", nargs="?", choices=COMMANDS,
                        help="what to run (--all: every evaluation)")
    parser.add_argument("--all", action="store_true", help="run every evaluation the data provides")
    parser.add_argument("--checkpoint", help="save_pretrained folder (runs/<name>/export)")
    parser.add_argument("--data", help="shard folder built by python -m melp_scale.shard build")
    parser.add_argument("--out", help="output folder (default runs/eval/<checkpoint>-<data>)")
    parser.add_argument("--task", action="append", default=[],
                        help="task name (repeatable; default: every task the data provides)")
    parser.add_argument("--split-csv", action="append", default=[], metavar="SPLIT=PATH",
                        help="published split file for train/val/test (repeatable)")
    parser.add_argument("--record-column", help="split CSV column with record names (default: auto)")
    parser.add_argument("--seed", type=int, default=0, help="seeds splits, subsets and the bootstrap")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="seeded split: val subjects")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="seeded split: test subjects")
    parser.add_argument("--normalize", default="minmax", help="ECG normalisation; must equal pretraining's")
    parser.add_argument("--crop-samples", type=int, help="centred crop (if pretraining cropped)")
    parser.add_argument("--batch-size", type=int, default=32, help="ECGs per forward pass")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates for CIs (0: none)")
    parser.add_argument("--zeroshot-split", default="test", help="task split for zero-shot: test or all")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1, 1.0],
                        help="linear-probe training fractions")
    parser.add_argument("--epochs", type=int, default=100, help="linear-probe epochs at most")
    parser.add_argument("--patience", type=int, default=10, help="linear-probe early-stopping patience")
    parser.add_argument("--split", default="val", help="shard split for retrieval, caption: train/val/all")
    parser.add_argument("--max-samples", type=int, default=64, help="caption at most this many reports")
    parser.add_argument("--beams", type=int, default=1, help="caption beam width (1: greedy)")
    parser.add_argument("--max-len", type=int, help="caption tokens per report (default: the model's)")
    parser.add_argument("--device", default="cpu", help="torch device")
    return parser.parse_args(argv)


def _split_csvs(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        split, sep, path = item.partition("=")
        if not sep:
            raise ValueError(f"--split-csv {item!r} is not SPLIT=PATH (e.g. test=icbeb_test.csv)")
        out[split.strip()] = path.strip()
    return out


def _default_out(checkpoint: str, data: str) -> str:
    ckpt = os.path.abspath(checkpoint)
    name = os.path.basename(os.path.dirname(ckpt) if os.path.basename(ckpt) == "export" else ckpt)
    return os.path.join("runs", "eval", f"{name}-{os.path.basename(os.path.abspath(data))}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    command = "all" if args.all else args.command
    try:
        if command == "tasks":
            from melp_scale.evaluate.tasks import TASKS

            for task in TASKS.values():
                print(f"{task.name:18s} source={task.source:9s} labels={'/'.join(task.label_keys):14s} "
                      f"split={task.split_rule:11s} "
                      f"classes({len(task.classes)})={', '.join(task.class_names)}")
            return 0
        if command is None:
            raise ValueError("name an evaluation (zeroshot, linear-probe, retrieval, caption) or --all")
        if not args.checkpoint or not args.data:
            raise ValueError("--checkpoint and --data are required")
        from melp_scale.evaluate import report, runner

        kinds = tuple(KINDS) if command == "all" else (command,)
        data_config = DataConfig(args.data, args.normalize, args.crop_samples, args.batch_size,
                                 args.seed, args.val_fraction, args.test_fraction,
                                 _split_csvs(args.split_csv), args.record_column)
        run_config = RunConfig(args.checkpoint, args.out or _default_out(args.checkpoint, args.data),
                               kinds, tuple(args.task), args.zeroshot_split, args.split,
                               args.bootstrap, args.device, skip_unavailable=command == "all")
        probe_config = ProbeConfig(tuple(args.fractions), epochs=args.epochs, patience=args.patience,
                                   seed=args.seed)
        caption_config = CaptionConfig(split=args.split, max_samples=args.max_samples, beams=args.beams,
                                       max_len=args.max_len)
        results = runner.run(run_config, data_config, probe_config, caption_config)
        print(report.summary_markdown(results))
        print(f"results: {os.path.join(run_config.out, 'results.json')} (+ results.md, roc/*.png); "
              f"timings (s): {results['timings_s']}")
        return 0
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
