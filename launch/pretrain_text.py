"""Stage-1 entry point: masked-language-model pretraining of the text encoder (DeepSpeed ZeRO-2).

    deepspeed launch/pretrain_text.py --ds_config ds.json                     # demo, offline
    deepspeed launch/pretrain_text.py --ds_config ds.json --config text_paper \
        corpus.shards=[shards/mimic] corpus.texts=[corpus/pubmed.jsonl,corpus/wiki]
    deepspeed launch/pretrain_text.py --ds_config ds.json --out runs/text --resume

The export (RUN/export) is a Hugging Face folder; stage 2 takes it as
``model.text.name_or_path=RUN/export``. Parse -> build -> train -> close, on both paths.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from melp_scale.train import cli  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = cli.common_parser("Text-encoder MLM pretraining (stage 1)", "text_demo",
                               "text_demo, text_paper")
    parser.add_argument("--model", help="HF id or local folder (overrides model.name_or_path)")
    args = parser.parse_intermixed_args(argv)  # key=value overrides may come between flags
    overrides = cli.common_overrides(args)
    overrides += [f"model.name_or_path={args.model}"] if args.model else []
    from melp_scale.text_pretrain.config import load_text_pretrain_config
    from melp_scale.text_pretrain.task import MLMTask

    return cli.run(args, load_text_pretrain_config, MLMTask, overrides)


if __name__ == "__main__":
    sys.exit(main())
