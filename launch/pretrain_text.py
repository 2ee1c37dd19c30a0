"""Stage-1 entry point: masked-language-model pretraining of the text encoder (DeepSpeed ZeRO-2).

    deepspeed launch/pretrain_text.py --ds_config ds.json                     # demo, offline
    deepspeed launch/pretrain_text.py --ds_config ds.json --config text_paper \
        corpus.shards=[shards/mimic] corpus.texts=[corpus/pubmed.jsonl,corpus/wiki]
    deepspeed launch/pretrain_text.py --ds_config ds.json --out runs/text --resume

The export (RUN/export) is a Hugging Face folder; stage 2 takes it as
``model.text.name_or_path=RUN/export``. Parse -> build -> train -> close, on both paths.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from melp_scale.text_pretrain.config import load_text_pretrain_config  # noqa: E402
from melp_scale.train.summary import print_summary  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Text-encoder MLM pretraining (stage 1)")
    parser.add_argument("--ds_config", "--deepspeed_config", dest="ds_config", default="ds.json",
                        help="DeepSpeed JSON (batch size, optimiser, precision, ZeRO)")
    parser.add_argument("--config", default="text_demo",
                        help="preset (text_demo, text_paper) or a YAML file")
    parser.add_argument("--model", help="HF id or local folder (overrides model.name_or_path)")
    parser.add_argument("--out", help="run folder (overrides run.out)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    parser.add_argument("--auto-resume", action="store_true",
                        help="continue from the latest checkpoint if there is one (SLURM requeue)")
    parser.add_argument("--max-steps", type=int, help="stop after this many optimiser steps")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. corpus.texts=[notes.jsonl]")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    overrides = list(args.overrides)
    overrides += [f"model.name_or_path={args.model}"] if args.model else []
    overrides += [f"run.out={args.out}"] if args.out else []
    overrides += [f"optim.max_steps={args.max_steps}"] if args.max_steps else []
    trainer = None
    try:
        config = load_text_pretrain_config(args.config, overrides)
        from melp_scale.text_pretrain.task import MLMTask
        from melp_scale.train.loop import Trainer

        resume = "latest" if args.resume else "auto" if args.auto_resume else None
        trainer = Trainer(MLMTask(config), args.ds_config, resume=resume)
        summary = trainer.run()
        if trainer.rank == 0:
            print_summary(summary)
            with open(os.path.join(config.run.out, "summary.json"), "w") as handle:
                json.dump(summary, handle, indent=1, default=str)
        return 0
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        if trainer is not None:
            trainer.close()


if __name__ == "__main__":
    sys.exit(main())
