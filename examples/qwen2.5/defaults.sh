# Qwen2.5: this family's defaults for examples/pretrain.sh and examples/sft.sh (sourced).
# Only values not already set in the environment are filled in.
: "${LR:=1e-5}"
: "${MIN_LR:=1e-6}"
: "${SEQ_LEN:=4096}"
export LR MIN_LR SEQ_LEN
