#!/usr/bin/env bash
# LoRA fine-tuning: adapters trained on a frozen base. LOAD is the base (a converted Megatron checkpoint or a HF
# model directory, read as weights only); SAVE receives adapter-only checkpoints (the adapters and their optimizer
# state, every TP/PP/EP rank file). Rerunning the same command resumes from SAVE once it holds a checkpoint.
# LoRA:   LORA_RANK=16 LORA_ALPHA=32 LORA_DROPOUT=0.0 LORA_TARGETS=all (or some of: linear_qkv linear_proj
#         linear_fc1 linear_fc2; MoE experts included) LORA_LOAD= (adapters to start from: a HF PEFT adapter
#         directory, or an adapter checkpoint of another LoRA run, loaded as adapters only)
# Data:   SFT=1 (default): DATA_PATH holds JSONL chat files; SFT=0: indexed pretraining data (as pretrain.sh).
# Output: SAVE_HF=DIR also writes the merged model (HF, loadable by transformers) at the end. The adapters as a
#         PEFT adapter: python -m toolkits.checkpoint mcore2hf --adapter-only --load-dir SAVE --save-dir OUT
# Other variables as in examples/pretrain.sh; LR defaults to 1e-4 and the distributed optimizer to off here
# (adapter optimizer state is small).
LR="${LR:-1e-4}" MIN_LR="${MIN_LR:-1e-5}" DISTRIBUTED_OPTIMIZER="${DISTRIBUTED_OPTIMIZER:-0}"
source "$(dirname "$0")/_launch.sh"
[ -n "${LOAD:-}" ] || die "LoRA needs LOAD (the base: a converted Megatron checkpoint or a HF model directory)"
if [ "${SFT:-1}" = 1 ]; then
  for p in $DATA_PATH; do [ -f "$p" ] || die "SFT data file $p does not exist"; done
  # shellcheck disable=SC2086
  ARGS+=(--sft --data-path $DATA_PATH)
else
  data_prefixes "$DATA_PATH"
  for p in "${PREFIXES[@]}"; do [ -f "$p.bin" ] && [ -f "$p.idx" ] || die "DATA_PATH prefix $p has no $p.bin/.idx"; done
  # shellcheck disable=SC2086
  ARGS+=(--data-path $DATA_PATH)
fi
# shellcheck disable=SC2086
ARGS+=(--lora-rank "${LORA_RANK:-16}" --lora-alpha "${LORA_ALPHA:-32}" --lora-dropout "${LORA_DROPOUT:-0.0}"
       --lora-target-modules ${LORA_TARGETS:-all})
if [ -f "$SAVE/latest_checkpointed_iteration.txt" ]; then
  ARGS+=(--lora-load "$SAVE")  # resume this run (iteration, optimizer, scheduler, RNG)
elif [ -n "${LORA_LOAD:-}" ]; then
  [ -d "$LORA_LOAD" ] || die "LORA_LOAD=$LORA_LOAD does not exist"
  ARGS+=(--lora-load "$LORA_LOAD" --finetune)
fi
[ -n "${SAVE_HF:-}" ] && ARGS+=(--save-hf "$SAVE_HF")
launch
