"""Megatron-LM's trainer with this project's model: ``pretrain_gpt.py``'s data and loop, our model provider.

    torchrun --nproc-per-node 8 examples/megatron_lm/pretrain_gpt.py --hf-config /models/Llama-3.2-1B \
        --use-checkpoint-args --load ckpt/llama3.2-1b-tp2 --tensor-model-parallel-size 2 \
        --micro-batch-size 1 --global-batch-size 64 --seq-length 4096 --bf16 --lr 1e-5 --train-iters 1000 \
        --data-path data/corpus_text_document --split 99,1,0 --save ckpt/llama3.2-1b-pt --save-interval 500

Needs a Megatron-LM checkout (tag matching the installed megatron-core) importable: on ``PYTHONPATH``, or named by
``MEGATRON_LM_PATH`` (appended to ``sys.path``, so the installed megatron-core stays the one imported). Every
Megatron-LM flag works as in its ``pretrain_gpt.py``; ``--hf-config DIR`` supplies the architecture (its values
are the defaults of ``--num-layers``, ``--norm-epsilon``, ... and of the tokenizer when DIR has one), and
``--rope-impl`` / ``--attention-impl`` choose kernels; ``--init-from-hf`` starts from the safetensors weights in
the ``--hf-config`` directory (no conversion step) and ``--save-hf DIR`` writes the trained model as a HF directory. The model is ``megatron_patch``'s: exact HF rope for every
family (any llama3 parameters), q/k norm, MoE routing as HF. Without CUDA it runs on CPU with gloo
(``megatron_patch.integrations.megatron_lm.enable_cpu``; add ``--distributed-backend gloo --transformer-impl local
--no-gradient-accumulation-fusion --no-persist-layer-norm``).
"""

import os
import sys

# This file shares its name with Megatron-LM's script, which is imported below: keep its own folder off the path.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
if os.environ.get("MEGATRON_LM_PATH"):
    sys.path.append(os.environ["MEGATRON_LM_PATH"])

import torch  # noqa: E402

from megatron_patch.integrations import megatron_lm  # noqa: E402

if not torch.cuda.is_available():
    megatron_lm.enable_cpu()

import pretrain_gpt  # noqa: E402  (Megatron-LM's script: its __main__ block does not run on import)
from megatron.core.enums import ModelType  # noqa: E402
from megatron.training import pretrain  # noqa: E402


def main() -> None:
    datasets = pretrain_gpt.train_valid_test_datasets_provider
    datasets.is_distributed = True  # as pretrain_gpt.py's own __main__ does
    pretrain(datasets, megatron_lm.model_provider, ModelType.encoder_or_decoder, pretrain_gpt.forward_step,
             args_defaults={"tokenizer_type": "GPT2BPETokenizer"},
             extra_args_provider=megatron_lm.extra_args_provider,
             get_embedding_ranks=pretrain_gpt.get_embedding_ranks)
    megatron_lm.save_hf()  # --save-hf DIR


if __name__ == "__main__":
    main()
