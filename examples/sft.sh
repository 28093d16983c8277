#!/usr/bin/env bash
# Generic supervised fine-tuning launcher: DATA_PATH is one or more JSONL chat files
# ({"messages": [{"role": ..., "content": ...}]}); the loss covers only the assistant's tokens.
# PACK=1 packs several conversations per sample. Other variables as in examples/pretrain.sh. With
# LOAD, only the weights are loaded (FINETUNE=1, fresh optimizer at iteration 0) unless FINETUNE=0.
source "$(dirname "$0")/_launch.sh"
for p in $DATA_PATH; do [ -f "$p" ] || die "SFT data file $p does not exist"; done
# shellcheck disable=SC2086
ARGS+=(--sft --data-path $DATA_PATH)
[ "${PACK:-0}" = 1 ] && ARGS+=(--sft-pack-sequences --transformer-impl local)
[ "${FINETUNE:-1}" = 1 ] && [ -n "${LOAD:-}" ] && ARGS+=(--finetune)
launch
