# Qwen3-MoE (and Qwen2-MoE, Mixtral): this family's defaults for examples/pretrain.sh and examples/sft.sh
# (applied with FAMILY=qwen3-moe). Only values not already set in the environment are filled in.
: "${LR:=1e-5}"
: "${MIN_LR:=1e-6}"
: "${SEQ_LEN:=4096}"
: "${MOE_DISPATCHER:=alltoall}"
# MoE with TP > 1 needs sequence parallelism (megatron-core requires it for training).
if [ "${TP:-1}" != 1 ]; then : "${SP:=1}"; fi
export LR MIN_LR SEQ_LEN MOE_DISPATCHER SP
