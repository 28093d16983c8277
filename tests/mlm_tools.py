"""Helpers that run real Megatron-LM code on CPU for ``tests/test_megatron_lm_real.py`` (launched with torchrun).

    mlm_tools.py run SCRIPT [Megatron-LM flags]        run a Megatron-LM script (e.g. pretrain_gpt.py) as __main__
    mlm_tools.py logits OUT [--provider] [flags]       build Megatron-LM's model (its gpt_builder, or with
                                                      --provider this project's model provider), load --load
                                                      with Megatron-LM's load_checkpoint, save fp32 logits of
                                                      fixed tokens (TP-gathered) to OUT

``MEGATRON_LM_PATH`` names the checkout (appended to ``sys.path``: the installed megatron-core stays the one
imported); ``integrations.megatron_lm.enable_cpu`` makes its trainer run without CUDA.
"""

import os
import runpy
import sys

sys.path.append(os.environ["MEGATRON_LM_PATH"])

from megatron_patch.integrations import megatron_lm  # noqa: E402

megatron_lm.enable_cpu()


def tokens(vocab: int):
    import torch

    return torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(1234))


def logits(out: str, provider: bool) -> None:
    import torch
    from functools import partial

    from megatron.core import tensor_parallel
    from megatron.core.enums import ModelType
    from megatron.training.checkpointing import load_checkpoint
    from megatron.training.initialize import initialize_megatron
    from megatron.training.training import get_model

    initialize_megatron(extra_args_provider=megatron_lm.extra_args_provider if provider else None,
                        args_defaults={"tokenizer_type": "GPT2BPETokenizer"})
    if provider:
        build = megatron_lm.model_provider
    else:
        from gpt_builders import gpt_builder
        from model_provider import model_provider

        build = partial(model_provider, gpt_builder)
    model = get_model(build, ModelType.encoder_or_decoder, wrap_with_ddp=False)
    iteration, _ = load_checkpoint(model, None, None, strict=True)
    m = model[0].eval()
    vocab = int(os.environ["CMP_VOCAB"])
    t = tokens(vocab)
    with torch.no_grad():
        y = m(t, torch.arange(t.shape[1]).expand_as(t), attention_mask=None)
        y = tensor_parallel.gather_from_tensor_model_parallel_region(y)[..., :vocab].float()
    if torch.distributed.get_rank() == 0:
        torch.save({"logits": y, "tokens": t, "iteration": iteration}, out)
    torch.distributed.barrier()


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "run":
        script = sys.argv[2]
        sys.argv = [script] + sys.argv[3:]
        runpy.run_path(script, run_name="__main__")
    else:
        out, rest = sys.argv[2], sys.argv[3:]
        provider = "--provider" in rest
        sys.argv = [sys.argv[0]] + [a for a in rest if a != "--provider"]
        logits(out, provider)
