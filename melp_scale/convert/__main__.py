"""python -m melp_scale.convert melp-official CKPT --out DIR [--text-model ID_OR_FOLDER]

Writes a normal ``MELP.from_pretrained`` export (config.json, model.safetensors, tokenizer/)
plus ``conversion.json`` (what was placed, dropped, tied, left fresh) into DIR.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m melp_scale.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("format", choices=["melp-official"], help="source format")
    parser.add_argument("checkpoint", help="official .ckpt / .safetensors / .bin, or a release folder")
    parser.add_argument("--out", required=True, help="export folder (created)")
    parser.add_argument("--text-model", default=None,
                        help="HF id or folder of the text model: its tokenizer (full checkpoints) "
                             "and weights (the ECG-only MELP_Encoder release)")
    args = parser.parse_args(argv)

    from melp_scale.convert import from_official

    try:
        model, report = from_official(args.checkpoint, text_model=args.text_model)
    except ValueError as error:
        print(f"melp_scale.convert: {error}", file=sys.stderr)
        return 2
    model.save_pretrained(args.out)
    with open(os.path.join(args.out, "conversion.json"), "w") as handle:
        json.dump(report, handle, indent=1)
    print(f"converted {report['source']} -> {args.out}")
    print(f"  prefixes found: {report['prefixes']}")
    print(f"  placed {report['placed']} official tensors ({report['parameters_loaded']:,} parameters); "
          f"sizes {report['sizes']}")
    print(f"  dropped {len(report['dropped'])} unused tensors ({report['dropped_elements']:,} elements), "
          f"{len(report['tied'])} tied copies")
    if report["fresh"]:
        print(f"  NOT in the checkpoint, freshly initialised: {len(report['fresh'])} tensors "
              f"(e.g. {report['fresh'][0]}); text model: {report['text_model']}")
    print(f"  report: {os.path.join(args.out, 'conversion.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
