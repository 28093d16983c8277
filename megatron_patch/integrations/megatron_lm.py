"""This project's models inside NVIDIA Megatron-LM's own trainer (``megatron.training.pretrain``), Pai style.

Megatron-LM's ``pretrain(dataset_provider, model_provider, model_type, forward_step, extra_args_provider=...)``
takes the model from a provider function. ``model_provider`` here builds it with this project's builder
(``models.builder.build_model``): the exact HF rope of every family (llama3 scaling with any parameters, which
Megatron-LM's own builder cannot express), the fused RoPE kernel choice (``--rope-impl``), q/k norm, the MoE
families with HF routing, padded-vocab masking. Data, loop, optimizer and checkpoints stay Megatron-LM's.

``extra_args_provider`` adds ``--hf-config DIR`` (the model's HF config.json and tokenizer), ``--rope-impl`` and
``--attention-impl``, ``--init-from-hf`` (start from that directory's safetensors weights, each rank reading its
own slices: no conversion step) and ``--save-hf DIR`` (write the trained model as a HF directory, ``save_hf``
after ``pretrain`` returns), and makes the HF config's values the defaults of Megatron-LM's architecture flags
(``--num-layers``, ``--norm-epsilon``, ``--qk-layernorm``, MoE routing, dropouts 0, ...): a launch needs only
``--hf-config`` plus the usual training flags. Flags given anyway must agree with the config: the provider
names every disagreement in one error. ``examples/megatron_lm/pretrain_gpt.py`` is the launcher.

``enable_cpu`` lets Megatron-LM's trainer run without CUDA (gloo), for tests and laptops: on top of
``runtime.cpu.enable`` it answers the few CUDA questions Megatron-LM's initialization asks.
"""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Optional

from megatron_patch.checkpointing.megatron_lm import group_query_attention, hf_dir_of
from megatron_patch.models.config import ModelArgs


def _peek(argv: list[str], flag: str) -> Optional[str]:
    """The value of ``flag`` on a command line not parsed yet (``--flag V`` or ``--flag=V``)."""
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


@functools.lru_cache(maxsize=None)
def model_args(hf_config: str) -> ModelArgs:
    """``ModelArgs`` of a HF directory or config.json (``ValueError`` naming the problem)."""
    from megatron_patch.models.family import args_from_hf, read_hf_config

    return args_from_hf(read_hf_config(hf_config))


def megatron_lm_defaults(margs: ModelArgs) -> dict:
    """Megatron-LM's argument values (its dest names) that describe this model; the field table gives most."""
    from megatron_patch.models.config import FIELDS, FIXED_ARCHITECTURE, moe_routing

    out = {f.mlm_arg: getattr(margs, f.name) for f in FIELDS if f.mlm_arg and (margs.is_moe or not f.moe)}
    theta = margs.rope.theta
    out.update(
        FIXED_ARCHITECTURE,
        group_query_attention=group_query_attention(margs),
        rotary_base=int(theta) if float(theta).is_integer() else theta,
        attention_dropout=0.0, hidden_dropout=0.0,  # as HF trained these models (Megatron-LM's default is 0.1)
    )
    if margs.is_moe:
        out.update(moe_routing(margs))
    return out


def extra_args_provider(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron-LM's ``extra_args_provider``: this project's flags, and the HF config's values as defaults."""
    from megatron_patch.fusions.rope import ROPE_IMPLS
    from megatron_patch.models.builder import ATTENTION_IMPLS

    g = parser.add_argument_group("megatron-patch model (examples/megatron_lm)")
    g.add_argument("--hf-config", required=True, metavar="DIR",
                   help="the model's HF directory (config.json, tokenizer) or config.json")
    g.add_argument("--rope-impl", default="auto", choices=ROPE_IMPLS, help="RoPE kernel: te, apex, triton or torch")
    g.add_argument("--attention-impl", default="auto", choices=ATTENTION_IMPLS,
                   help="core attention of the local layer spec: torch SDPA (auto) or megatron's")
    g.add_argument("--init-from-hf", action="store_true",
                   help="start from the safetensors weights of the --hf-config directory, every rank reading only "
                        "its own slices (no conversion step); a checkpoint in --load still wins (resume)")
    g.add_argument("--save-hf", default=None, metavar="DIR",
                   help="after training, write the model as a HF directory (safetensors, config, tokenizer) here")
    hf = _peek(sys.argv[1:], "--hf-config")
    if hf:
        import os

        try:
            margs = model_args(hf)
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: --hf-config {hf}: {e}") from None
        defaults = megatron_lm_defaults(margs)
        # The model's vocab padded as the converter pads it (Megatron-LM would pad its tokenizer's vocab, which
        # may be smaller than the model's, and then no converted checkpoint would load).
        tp = int(_peek(sys.argv[1:], "--tensor-model-parallel-size") or 1)
        divisible = int(_peek(sys.argv[1:], "--make-vocab-size-divisible-by") or 128)
        defaults["padded_vocab_size"] = margs.padded_vocab_size(divisible, tp)
        hf_dir = hf if os.path.isdir(hf) else os.path.dirname(os.path.abspath(hf))
        if any(os.path.isfile(os.path.join(hf_dir, n)) for n in ("tokenizer.json", "tokenizer.model")):
            defaults.update(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=hf_dir)
        parser.set_defaults(**defaults)
    return parser


def check_args(args, margs: ModelArgs) -> None:
    """Megatron-LM's parsed args must describe the HF model: one ``ValueError`` listing every disagreement."""
    from megatron_patch.checkpointing.megatron_lm import disagreements

    wrong = disagreements(args, margs)
    tokens = _tokenizer_size()
    if tokens is not None and tokens > margs.vocab_size:
        wrong.append(f"the tokenizer has {tokens} tokens, more than the model's vocab_size {margs.vocab_size}")
    if getattr(args, "padded_vocab_size", None) and args.padded_vocab_size % args.tensor_model_parallel_size:
        wrong.append(f"padded_vocab_size {args.padded_vocab_size} is not divisible by TP")
    if wrong:
        raise ValueError(f"Megatron-LM flags disagree with --hf-config {args.hf_config}: " + "; ".join(wrong))


def _tokenizer_size() -> Optional[int]:
    try:
        from megatron.training import get_tokenizer

        return get_tokenizer().vocab_size
    except Exception:  # noqa: BLE001 - no tokenizer built (yet): nothing to check
        return None


def model_provider(pre_process: bool = True, post_process: bool = True, vp_stage: Optional[int] = None,
                   config=None, pg_collection=None):
    """Megatron-LM's model provider: this rank's ``GPTModel`` chunk built by ``models.builder.build_model``.

    The ``TransformerConfig`` is Megatron-LM's own (``core_transformer_config_from_args``: every training flag
    it knows applies: recompute, FP8, dropouts, ...) unless one is passed in. The vocab is Megatron-LM's
    ``padded_vocab_size`` (from its tokenizer or the checkpoint), so checkpoints and data agree with it.
    """
    from megatron.training import get_args

    from megatron_patch.models.builder import build_model

    args = get_args()
    margs = model_args(args.hf_config)
    check_args(args, margs)
    if config is None:
        from megatron.training.arguments import core_transformer_config_from_args

        config = core_transformer_config_from_args(args)
    if not _BUILT:
        _check_hf_paths(args)
    tp = config.tensor_model_parallel_size
    model = build_model(margs, config, transformer_impl=args.transformer_impl, rope_impl=args.rope_impl,
                        make_vocab_size_divisible_by=args.padded_vocab_size // tp, vp_stage=vp_stage,
                        pre_process=pre_process, post_process=post_process, attention_impl=args.attention_impl,
                        pg_collection=pg_collection)
    if args.init_from_hf:
        # Before Megatron-LM wraps the model and its optimizer copies the parameters; its load_checkpoint
        # runs afterwards and replaces these weights only if --load holds a checkpoint.
        from megatron_patch.checkpointing.sources import load_into_model

        load_into_model(model, _hf_source(hf_dir_of(args.hf_config)), vp_stage=vp_stage)
    _BUILT.append(model)
    return model


# This rank's model chunks as built by ``model_provider`` (the modules Megatron-LM wraps and trains in place),
# for ``save_hf`` after ``pretrain`` returns.
_BUILT: list = []


@functools.lru_cache(maxsize=None)
def _hf_source(hf_dir: str):
    from megatron_patch.checkpointing.hf import HFSource

    source = HFSource(hf_dir)
    source.preflight()  # every tensor present with its shape, before any is read
    return source


def _check_hf_paths(args) -> None:
    """``--init-from-hf`` needs weights in the --hf-config directory; ``--save-hf`` may not replace an input
    or a directory it did not write. One ``error:`` line (SystemExit) before any weight is read."""
    from megatron_patch.checkpointing.hf_export import check_output
    from megatron_patch.checkpointing.errors import CheckpointError

    if args.init_from_hf:
        try:
            _hf_source(hf_dir_of(args.hf_config))
        except (CheckpointError, OSError, ValueError) as e:
            raise SystemExit(f"error: --init-from-hf: {e}") from None
    if args.save_hf:
        try:
            check_output(args.save_hf, (args.hf_config, args.load, args.save, getattr(args, "tokenizer_model", None)))
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None


def save_hf() -> Optional[str]:
    """``--save-hf``: after ``pretrain`` returns (Megatron-LM has completed any overlapped parameter gather and
    left the process groups up), every rank writes its own part of the model (``hf_export.save_hf``)."""
    from megatron.training import get_args

    args = get_args()
    if not args.save_hf:
        return None
    import torch.distributed as dist

    from megatron_patch.checkpointing.hf_export import save_hf as write
    from megatron_patch.models.family import read_hf_config

    out = write(_BUILT, model_args(args.hf_config), args.save_hf, read_hf_config(args.hf_config), args.params_dtype,
                metadata_from=(hf_dir_of(args.hf_config),))
    if dist.get_rank() == 0:
        print(f"saved HF model to {out}", flush=True)
    return out


def enable_cpu() -> None:
    """Run Megatron-LM's trainer on CPU (gloo): ``runtime.cpu.enable()`` plus Megatron-LM's own CUDA checks.

    - its initialization sets up model-parallel groups and RNG trackers only if ``torch.cuda.device_count()`` is
      positive: report one device (``cpu.enable`` reports none);
    - ``initialize_megatron`` refuses to run without CUDA unless ``allow_no_cuda``, which ``pretrain`` never
      passes: pass it;
    - ``_compile_dependencies`` runs ``make`` for the dataset helpers (the megatron-core wheel ships them
      compiled) and builds fused CUDA kernels: skip it;
    - ``validate_args`` asks the GPU's architecture when TP > 1: answer a pre-Blackwell one.
    Run with ``--distributed-backend gloo --transformer-impl local --no-gradient-accumulation-fusion
    --no-persist-layer-norm`` (and ``--no-masked-softmax-fusion`` with bf16/fp16).
    """
    import torch

    import megatron.training.arguments as mlm_arguments
    import megatron.training.initialize as mlm_initialize
    import megatron.training.training as mlm_training
    import megatron.training.utils as mlm_utils
    from megatron_patch.runtime import cpu

    cpu.enable()
    torch.cuda.device_count = lambda: 1
    initialize = mlm_initialize.initialize_megatron
    if not getattr(initialize, "_megatron_patch_cpu", False):
        @functools.wraps(initialize)
        def initialize_megatron(*a, **kw):
            kw["allow_no_cuda"] = True
            return initialize(*a, **kw)

        initialize_megatron._megatron_patch_cpu = True
        mlm_initialize.initialize_megatron = mlm_training.initialize_megatron = initialize_megatron
    mlm_initialize._compile_dependencies = lambda: None
    mlm_arguments.get_device_arch_version = mlm_utils.get_device_arch_version = lambda: 9
