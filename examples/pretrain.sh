#!/usr/bin/env bash
# Generic pretraining launcher. Environment variables (defaults in examples/_launch.sh):
#   FAMILY (applies examples/$FAMILY/defaults.sh), LOAD or MODEL_CONFIG, DATA_PATH ("PREFIX" or
#   "W1 PREFIX1 W2 PREFIX2"), TOKENIZER, SAVE,
#   TP PP VPP SP MBS GBS SEQ_LEN LR MIN_LR TRAIN_ITERS WARMUP PRECISION SAVE_INTERVAL RECOMPUTE,
#   GPUS_PER_NODE NNODES NODE_RANK MASTER_ADDR MASTER_PORT.
# Example: FAMILY=llama3 LOAD=ckpt/llama3-8b-tp2 TP=2 DATA_PATH=data/corpus_text_document TOKENIZER=hf/Llama-3.1-8B \
#          SAVE=ckpt/llama3-8b-pt bash examples/pretrain.sh
source "$(dirname "$0")/_launch.sh"
data_prefixes "$DATA_PATH"
for p in "${PREFIXES[@]}"; do
  [ -f "$p.bin" ] && [ -f "$p.idx" ] || die "DATA_PATH prefix $p has no $p.bin/$p.idx (run: python -m toolkits.data.preprocess)"
done
# shellcheck disable=SC2086
ARGS+=(--data-path $DATA_PATH)
launch
