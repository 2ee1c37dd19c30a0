#!/usr/bin/env bash
# MELP's two stages as one recipe: stage 1 trains the text encoder with
# masked-language modelling (launch/pretrain_text.py), stage 2 pretrains MELP with the stage-1
# export as its text encoder (launch/pretrain.py ... model.text.name_or_path=OUT/stage1/export).
#
#   launch/recipes/paper.sh --out runs/melp \
#       --stage1 corpus.texts=[corpus/pubmed.jsonl,corpus/wiki] \
#       --stage2 --shards shards/mimic
#   launch/recipes/paper.sh --demo                      # both demo presets, offline, on a CPU
#   LAUNCHER="deepspeed --num_gpus 4" launch/recipes/paper.sh ...
#
# Options: --demo (presets text_demo + demo instead of text_paper + paper), --out DIR (default
# runs/melp, or runs/melp-demo), then --stage1 ARGS... and/or --stage2 ARGS...: arguments and
# key=value overrides passed to that stage's launcher as they are.
# Environment: LAUNCHER (default "deepspeed"; "python" runs one process), DS_CONFIG (default
# the repository's ds.json). Relative paths are read from the current folder, as the launchers do.
# Re-running continues: a finished stage 1 (OUT/stage1/export) is not run again, and both
# stages resume from their latest checkpoint (--auto-resume).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
read -r -a launcher <<< "${LAUNCHER:-deepspeed}"
ds_config="${DS_CONFIG:-$repo/ds.json}"
text_preset=text_paper
melp_preset=paper
out=""
stage1_args=()
stage2_args=()
target=""
while (($#)); do
    case "$target:$1" in
        *:--stage1) target=stage1 ;;
        *:--stage2) target=stage2 ;;
        stage1:*) stage1_args+=("$1") ;;
        stage2:*) stage2_args+=("$1") ;;
        :--demo) text_preset=text_demo; melp_preset=demo ;;
        :--out) out="${2:?--out needs a folder}"; shift ;;
        :-h|:--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) echo "paper.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
if [[ -z "$out" ]]; then
    out=runs/melp
    [[ "$melp_preset" == demo ]] && out=runs/melp-demo
fi
stage1="$out/stage1"
stage2="$out/stage2"

if [[ -f "$stage1/export/config.json" ]]; then
    echo "== stage 1: done ($stage1/export exists; remove it to train stage 1 again)"
else
    echo "== stage 1: $text_preset -> $stage1"
    "${launcher[@]}" "$repo/launch/pretrain_text.py" --ds_config "$ds_config" --config "$text_preset" \
        --out "$stage1" --auto-resume ${stage1_args[@]+"${stage1_args[@]}"}
    if [[ ! -f "$stage1/export/config.json" ]]; then
        echo "paper.sh: stage 1 stopped before its export ($stage1/export); run again to continue" >&2
        exit 1
    fi
fi

text_model="$(cd "$stage1/export" && pwd)"
echo "== stage 2: $melp_preset with text encoder $text_model -> $stage2"
"${launcher[@]}" "$repo/launch/pretrain.py" --ds_config "$ds_config" --config "$melp_preset" \
    --out "$stage2" --auto-resume "model.text.name_or_path=$text_model" \
    ${stage2_args[@]+"${stage2_args[@]}"}
if [[ -d "$stage2/export" ]]; then
    echo "== done: MELP.from_pretrained(\"$stage2/export\")$([[ -d "$stage2/export-best" ]] && echo "; best by selection: $stage2/export-best")"
fi
