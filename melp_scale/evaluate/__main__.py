"""``python -m melp_scale.evaluate``: zero-shot, linear probe, fine-tuning, retrieval, report
generation, patient identification.

    python -m melp_scale.evaluate zeroshot --checkpoint runs/demo/export --data shards/ptbxl
    python -m melp_scale.evaluate zeroshot --checkpoint DIR --data shards/ptbxl --prompts my_prompts.json
    python -m melp_scale.evaluate linear-probe --checkpoint DIR --data DIR --task cpsc2018 \\
        --fractions 0.01 0.1 1.0 --probe-preset official --protocol melp
    python -m melp_scale.evaluate finetune --checkpoint DIR --data shards/ptbxl --task ptbxl-super
    python -m melp_scale.evaluate zeroshot --checkpoint DIR --data shards/ptbxl --task ptbxl-super \\
        --split-csv train=ptbxl_super_class_train.csv --split-csv val=ptbxl_super_class_val.csv \\
        --split-csv test=ptbxl_super_class_test.csv
    python -m melp_scale.evaluate patient-id --checkpoint DIR --data shards/ptbxl
    python -m melp_scale.evaluate caption --checkpoint DIR --data shards/ptbxl --max-samples 64
    python -m melp_scale.evaluate --all --checkpoint DIR --data DIR     # every evaluation but finetune
    python -m melp_scale.evaluate tasks                                # the task registry
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from melp_scale.evaluate.caption import CaptionConfig
from melp_scale.evaluate.data import DataConfig
from melp_scale.evaluate.finetune import FinetuneConfig
from melp_scale.evaluate.linear_probe import PRESETS, ProbeConfig
from melp_scale.evaluate.runner import ALL_KINDS, KINDS, PROTOCOLS, RunConfig

COMMANDS = (*KINDS, "all", "tasks")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m melp_scale.evaluate",
                                     description="Evaluate a MELP checkpoint on labelled shards")
    parser.add_argument("command", nargs="?", choices=COMMANDS,
                        help="what to run (--all: every evaluation)")
    parser.add_argument("--all", action="store_true",
                        help="run every evaluation the data provides (fine-tuning excepted)")
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
    parser.add_argument("--probe-preset", default="ours", choices=sorted(PRESETS),
                        help="linear-probe settings: ours (batch 16, patience 10) or official "
                             "(batch 128, patience 5)")
    parser.add_argument("--patience", type=int, help="linear-probe early-stopping patience (default: preset's)")
    parser.add_argument("--probe-batch-size", type=int, help="linear-probe batch (default: preset's)")
    parser.add_argument("--allow-pretraining-rows", action="store_true",
                        help="score a shard set or subjects the checkpoint was pretrained on "
                             "(refused by default; the results say so)")
    parser.add_argument("--prompts", help="zero-shot prompt file {class: prompt or [prompts]} "
                                          "(default: melp-scale's own)")
    parser.add_argument("--protocol", default="ours", choices=sorted(PROTOCOLS),
                        help="input protocol: ours, or melp (CPSC2018: first 5 s zero-padded to 10 s)")
    parser.add_argument("--auc-scores", default="sigmoid", choices=("sigmoid", "softmax"),
                        help="AUC of per-class sigmoid scores (default, correct for multi-label) "
                             "or of a softmax over classes (compatibility only)")
    parser.add_argument("--ft-lr", type=float, default=3e-4, help="fine-tuning lr of the head / top layer")
    parser.add_argument("--layer-decay", type=float, default=0.75, help="fine-tuning lr decay per layer")
    parser.add_argument("--ft-epochs", type=int, default=30, help="fine-tuning epochs at most")
    parser.add_argument("--ft-patience", type=int, default=5, help="fine-tuning early-stopping patience")
    parser.add_argument("--ft-batch-size", type=int, default=32, help="fine-tuning ECGs per step")
    parser.add_argument("--patient-split", default="test", choices=("test", "all"),
                        help="patient identification: PTB-XL test fold (else shard val) or all")
    parser.add_argument("--split", default="auto",
                        help="retrieval and caption split: train/val/test/all; auto: test fold "
                             "on PTB-XL, else the shard set's val split")
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
            raise ValueError(f"name an evaluation ({', '.join(KINDS)}) or --all")
        if not args.checkpoint or not args.data:
            raise ValueError("--checkpoint and --data are required")
        from melp_scale.evaluate import report, runner

        kinds = tuple(ALL_KINDS) if command == "all" else (command,)
        data_config = DataConfig(args.data, args.normalize, args.crop_samples, args.batch_size,
                                 args.seed, args.val_fraction, args.test_fraction,
                                 _split_csvs(args.split_csv), args.record_column)
        run_config = RunConfig(args.checkpoint, args.out or _default_out(args.checkpoint, args.data),
                               kinds, tuple(args.task), args.zeroshot_split, args.split,
                               args.bootstrap, args.device, skip_unavailable=command == "all",
                               allow_pretraining_rows=args.allow_pretraining_rows,
                               prompts=args.prompts, protocol=args.protocol,
                               auc_scores=args.auc_scores, patient_split=args.patient_split)
        probe_config = ProbeConfig.from_preset(args.probe_preset, fractions=tuple(args.fractions),
                                               epochs=args.epochs, patience=args.patience,
                                               batch_size=args.probe_batch_size, seed=args.seed)
        finetune_config = FinetuneConfig(tuple(args.fractions), lr=args.ft_lr,
                                         layer_decay=args.layer_decay, epochs=args.ft_epochs,
                                         patience=args.ft_patience, batch_size=args.ft_batch_size,
                                         seed=args.seed)
        caption_config = CaptionConfig(split=args.split, max_samples=args.max_samples, beams=args.beams,
                                       max_len=args.max_len)
        results = runner.run(run_config, data_config, probe_config, caption_config, finetune_config)
        print(report.summary_markdown(results))
        print(f"results: {os.path.join(run_config.out, 'results.json')} (+ results.md, PNGs); "
              f"timings (s): {results['timings_s']}")
        return 0
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
