"""MELP pretraining entry point (stage 2, DeepSpeed ZeRO-2).

    deepspeed launch/pretrain.py --ds_config ds.json                       # demo, offline
    deepspeed launch/pretrain.py --ds_config ds.json --config paper --shards shards/mimic
    deepspeed launch/pretrain.py --ds_config ds.json --resume optim.max_steps=2000

Parse -> build -> train -> close, on the error path as on the success path.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from melp_scale.train import cli  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = cli.common_parser("MELP pretraining with DeepSpeed ZeRO-2", "demo", "demo, paper")
    parser.add_argument("--shards", help="shard folder (overrides data.shards)")
    args = parser.parse_intermixed_args(argv)  # key=value overrides may come between flags
    overrides = cli.common_overrides(args)
    # an explicit --shards must exist: never build the synthetic demo set in its place
    overrides += [f"data.shards={args.shards}", "data.build_demo_if_missing=false"] if args.shards else []
    from melp_scale.train.config import load_train_config
    from melp_scale.train.melp_task import MELPTask

    return cli.run(args, load_train_config, MELPTask, overrides)


if __name__ == "__main__":
    sys.exit(main())
