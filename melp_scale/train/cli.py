"""What both launchers share: common arguments and the parse -> build -> train -> close run.

``launch/pretrain.py`` (stage 2) and ``launch/pretrain_text.py`` (stage 1) add their own flags
and name their config loader and task; everything else is here, once.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, Callable


def common_parser(description: str, default_config: str, presets: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--ds_config", "--deepspeed_config", dest="ds_config", default="ds.json",
                        help="DeepSpeed JSON (batch size, optimiser, precision, ZeRO)")
    parser.add_argument("--config", default=default_config, help=f"preset ({presets}) or a YAML file")
    parser.add_argument("--out", help="run folder (overrides run.out)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    parser.add_argument("--auto-resume", action="store_true",
                        help="continue from the latest checkpoint if there is one (SLURM requeue)")
    parser.add_argument("--max-steps", type=int, help="stop after this many optimiser steps")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*",
                        help="key=value, e.g. optim.warmup_steps=50 or "
                             "deepspeed.train_micro_batch_size_per_gpu=32 (over ds.json)")
    return parser


def common_overrides(args: argparse.Namespace) -> list[str]:
    overrides = list(args.overrides)
    overrides += [f"run.out={args.out}"] if args.out else []
    overrides += [f"optim.max_steps={args.max_steps}"] if args.max_steps is not None else []
    return overrides


def run(args: argparse.Namespace, load_config: Callable[[str, list[str]], Any],
        make_task: Callable[[Any], Any], overrides: list[str]) -> int:
    """Build the task's Trainer, train, print the summary; 2 on a user error, 0 otherwise."""
    from melp_scale.train.config import read_deepspeed_overrides
    from melp_scale.train.summary import print_summary

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    trainer = None
    try:
        config = load_config(args.config, overrides)
        ds_overrides = read_deepspeed_overrides(args.config, overrides)
        check_writable(config.run.out)
        from melp_scale.train.loop import Trainer

        resume = "latest" if args.resume else "auto" if args.auto_resume else None
        trainer = Trainer(make_task(config), args.ds_config, resume=resume,
                          ds_overrides=ds_overrides)
        summary = trainer.run()
        if trainer.rank == 0:
            print_summary(summary)
            with open(os.path.join(config.run.out, "summary.json"), "w") as handle:
                json.dump(summary, handle, indent=1, default=str)
        return 0
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a read-only or full --out, a path through a file, ...
        print(f"error: cannot write {error.filename or 'the run folder'}: "
              f"{error.strerror or error}", file=sys.stderr)
        return 2
    except RuntimeError as error:  # torch's DistNetworkError when the rendezvous port is taken
        if "EADDRINUSE" not in str(error):
            raise
        print(f"error: {port_in_use()}", file=sys.stderr)
        return 2
    finally:
        if trainer is not None:
            trainer.close()


def check_writable(out: str) -> None:
    """OSError (naming the path) now, before any work, when the run folder cannot be written."""
    os.makedirs(out, exist_ok=True)
    probe = os.path.join(out, f".write-check-{os.getpid()}")
    with open(probe, "w") as handle:
        handle.write("ok")
    os.remove(probe)


def port_in_use() -> str:
    port, host = os.environ.get("MASTER_PORT", "?"), os.environ.get("MASTER_ADDR", "?")
    return (f"the rendezvous port {port} on {host} is already in use (another run?): pass a free "
            f"one with --master_port, e.g. `deepspeed --master_port 29611 launch/pretrain.py ...` "
            f"(torchrun takes --master_port too; SLURM: export MASTER_PORT)")
