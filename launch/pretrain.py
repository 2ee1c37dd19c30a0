"""MELP pretraining entry point (DeepSpeed ZeRO-2).

    deepspeed launch/pretrain.py --ds_config ds.json                       # demo, offline
    deepspeed launch/pretrain.py --ds_config ds.json --config paper --shards shards/mimic
    deepspeed launch/pretrain.py --ds_config ds.json --resume optim.max_steps=2000

Parse -> build -> train -> close, on the error path as on the success path.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from melp_scale.train.config import load_train_config  # noqa: E402
from melp_scale.train.summary import print_summary  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="MELP pretraining with DeepSpeed ZeRO-2")
    parser.add_argument("--ds_config", "--deepspeed_config", dest="ds_config", default="ds.json",
                        help="DeepSpeed JSON (batch size, optimiser, precision, ZeRO)")
    parser.add_argument("--config", default="demo", help="preset (demo, paper) or a YAML file")
    parser.add_argument("--shards", help="shard folder (overrides data.shards)")
    parser.add_argument("--out", help="run folder (overrides run.out)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    parser.add_argument("--auto-resume", action="store_true",
                        help="continue from the latest checkpoint if there is one (SLURM requeue)")
    parser.add_argument("--max-steps", type=int, help="stop after this many optimiser steps")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. optim.warmup_steps=50")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    overrides = list(args.overrides)
    # an explicit --shards must exist: never build the synthetic demo set in its place
    overrides += [f"data.shards={args.shards}", "data.build_demo_if_missing=false"] if args.shards else []
    overrides += [f"run.out={args.out}"] if args.out else []
    overrides += [f"optim.max_steps={args.max_steps}"] if args.max_steps else []
    trainer = None
    try:
        config = load_train_config(args.config, overrides)
        from melp_scale.train.loop import Trainer
        from melp_scale.train.melp_task import MELPTask

        resume = "latest" if args.resume else "auto" if args.auto_resume else None
        trainer = Trainer(MELPTask(config), args.ds_config, resume=resume)
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
