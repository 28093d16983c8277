# Shared by pretrain.sh and sft.sh (sourced, not run): environment -> torchrun + megatron_patch.pretrain flags.
#
# Family:      FAMILY=llama3|qwen2.5|qwen3|... applies examples/$FAMILY/defaults.sh (only unset variables)
# Model:       LOAD (Megatron checkpoint: converted or trained)  or  MODEL_CONFIG (HF config.json, from scratch)
# Parallelism: TP=1 PP=1 VPP= (layers per virtual stage) SP=0|1 DISTRIBUTED_OPTIMIZER=1
#              CP=1 (context parallel; SEQ_LEN a multiple of 2 x CP) CP_COMM_TYPE= (TE: p2p|a2a|allgather; local: allgather)
# MoE:         EP=1 ETP= (expert TP, default TP) MOE_DISPATCHER=alltoall|allgather|flex MOE_AUX_LOSS_COEFF=
# Batch:       MBS=1 GBS=8 SEQ_LEN=2048
# Schedule:    LR=1e-5 MIN_LR=1e-6 DECAY=cosine TRAIN_ITERS=1000 WARMUP=10 WEIGHT_DECAY=0.1 CLIP_GRAD=1.0
# Precision:   PRECISION=bf16|fp16|fp32 (default bf16 on GPU, fp32 on CPU)
# Memory:      RECOMPUTE=none|selective|full
# Data:        DATA_PATH (required)  TOKENIZER (required: HF tokenizer directory)  SPLIT=99,1,0
# Output:      SAVE (required) SAVE_INTERVAL=500 CKPT_FORMAT=torch|torch_dist LOG_INTERVAL=1 TENSORBOARD_DIR=
# Launch:      GPUS_PER_NODE (default: all GPUs, or 1 on CPU) NNODES=1 NODE_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500
# Anything in EXTRA_ARGS is appended verbatim.
set -euo pipefail
die() { echo "error: $*" >&2; exit 2; }
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python}"

if [ -n "${FAMILY:-}" ]; then
  defaults="$ROOT/examples/$FAMILY/defaults.sh"
  [ -f "$defaults" ] || die "FAMILY=$FAMILY has no $defaults (families: $(cd "$ROOT/examples" && ls -d */ | tr -d / | tr '\n' ' '))"
  # shellcheck source=/dev/null
  source "$defaults"
fi

# data_prefixes "$DATA_PATH" sets PREFIXES to the dataset prefixes of "PREFIX [PREFIX ...]" or of weighted
# pairs "W1 PREFIX1 W2 PREFIX2 ..." (weighted when there is more than one word and the first is a number:
# the rule of --data-path itself). Not a subshell, so that `die` ends the launcher.
data_prefixes() {
  local -a words
  local i
  read -r -a words <<< "$1"
  PREFIXES=()
  if [ "${#words[@]}" -gt 1 ] && [[ "${words[0]}" =~ ^[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?$ ]]; then
    [ $(( ${#words[@]} % 2 )) -eq 0 ] || die "DATA_PATH with weights needs pairs: W1 PREFIX1 W2 PREFIX2 ..."
    for (( i = 1; i < ${#words[@]}; i += 2 )); do PREFIXES+=("${words[i]}"); done
  else
    PREFIXES=("${words[@]}")
  fi
}

[ -n "${LOAD:-}${MODEL_CONFIG:-}" ] || die "set LOAD (a Megatron checkpoint) or MODEL_CONFIG (a HF config.json)"
[ -z "${LOAD:-}" ] || [ -d "$LOAD" ] || die "LOAD=$LOAD does not exist (convert a HF model first: see the README of your family)"
[ -z "${MODEL_CONFIG:-}" ] || [ -e "$MODEL_CONFIG" ] || die "MODEL_CONFIG=$MODEL_CONFIG does not exist"
[ -n "${DATA_PATH:-}" ] || die "set DATA_PATH"
[ -n "${TOKENIZER:-}" ] || die "set TOKENIZER (a HF tokenizer directory)"
[ -d "$TOKENIZER" ] || die "TOKENIZER=$TOKENIZER does not exist"
[ -n "${SAVE:-}" ] || die "set SAVE (where checkpoints go)"

if [ -z "${GPUS_PER_NODE:-}" ]; then
  GPUS_PER_NODE=$("$PY" -c "import torch; print(torch.cuda.device_count() or 1)")
fi
HAS_GPU=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))")
PRECISION="${PRECISION:-$([ "$HAS_GPU" = 1 ] && echo bf16 || echo fp32)}"

ARGS=(
  --tensor-model-parallel-size "${TP:-1}" --pipeline-model-parallel-size "${PP:-1}"
  --micro-batch-size "${MBS:-1}" --global-batch-size "${GBS:-8}" --seq-length "${SEQ_LEN:-2048}"
  --lr "${LR:-1e-5}" --min-lr "${MIN_LR:-1e-6}" --lr-decay-style "${DECAY:-cosine}"
  --train-iters "${TRAIN_ITERS:-1000}" --lr-warmup-iters "${WARMUP:-10}"
  --weight-decay "${WEIGHT_DECAY:-0.1}" --clip-grad "${CLIP_GRAD:-1.0}"
  --tokenizer-model "$TOKENIZER" --split "${SPLIT:-99,1,0}"
  --save "$SAVE" --save-interval "${SAVE_INTERVAL:-500}" --ckpt-format "${CKPT_FORMAT:-torch}"
  --log-interval "${LOG_INTERVAL:-1}" --seed "${SEED:-1234}"
)
[ -n "${LOAD:-}" ] && ARGS+=(--load "$LOAD")
[ -n "${MODEL_CONFIG:-}" ] && ARGS+=(--model-config "$MODEL_CONFIG")
[ -n "${VPP:-}" ] && ARGS+=(--num-layers-per-virtual-pipeline-stage "$VPP")
[ "${SP:-0}" = 1 ] && ARGS+=(--sequence-parallel)
[ "${CP:-1}" != 1 ] && ARGS+=(--context-parallel-size "$CP")
[ -n "${CP_COMM_TYPE:-}" ] && ARGS+=(--cp-comm-type "$CP_COMM_TYPE")
[ "${EP:-1}" != 1 ] && ARGS+=(--expert-model-parallel-size "$EP")
[ -n "${ETP:-}" ] && ARGS+=(--expert-tensor-parallel-size "$ETP")
[ -n "${MOE_DISPATCHER:-}" ] && ARGS+=(--moe-token-dispatcher-type "$MOE_DISPATCHER")
[ -n "${MOE_AUX_LOSS_COEFF:-}" ] && ARGS+=(--moe-aux-loss-coeff "$MOE_AUX_LOSS_COEFF")
[ "${DISTRIBUTED_OPTIMIZER:-1}" = 1 ] && ARGS+=(--use-distributed-optimizer)
[ -n "${TENSORBOARD_DIR:-}" ] && ARGS+=(--tensorboard-dir "$TENSORBOARD_DIR")
case "$PRECISION" in
  bf16) ARGS+=(--bf16) ;; fp16) ARGS+=(--fp16) ;; fp32) ;; *) die "PRECISION must be bf16, fp16 or fp32" ;;
esac
case "${RECOMPUTE:-none}" in
  none) ;; selective) ARGS+=(--recompute-granularity selective) ;;
  full) ARGS+=(--recompute-granularity full --recompute-method uniform --recompute-num-layers 1) ;;
  *) die "RECOMPUTE must be none, selective or full" ;;
esac

launch() {  # launch [mode flags...]: mode flags come first so EXTRA_ARGS can override anything
  cd "$ROOT"
  # shellcheck disable=SC2086
  exec "$PY" -m torch.distributed.run --nproc-per-node "$GPUS_PER_NODE" --nnodes "${NNODES:-1}" \
    --node-rank "${NODE_RANK:-0}" --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "${MASTER_PORT:-29500}" \
    -m megatron_patch.pretrain "$@" "${ARGS[@]}" ${EXTRA_ARGS:-}
}
