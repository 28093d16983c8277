"""Command-line arguments of ``python -m megatron_patch.pretrain``: one parser, grouped by concern, and the one
translation of the parsed flags into the typed run configuration (``training/config.py``).

Flag names follow Megatron-LM so existing launch scripts read the same (its other flags: ``megatron_lm_flags``).
``parse_args`` checks what needs no model (batch sizes that do not divide, the parallel layout against the
world size, ...) and raises ``ArgumentError`` with one clear line before any process group exists;
``run_config`` then checks what depends on the model (its layout rules, architecture flags, the padded vocab)
and builds the frozen ``RunConfig`` everything below the command line reads. World size comes from torchrun's
``WORLD_SIZE`` (1 when run directly). The parallel-layout rules themselves are ``ParallelLayout.check``'s.
"""

from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence

from megatron_patch import data_checks, dtypes
from megatron_patch.checkpointing.layout import CKPT_FORMATS
from megatron_patch.fusions.rope import ROPE_IMPLS
from megatron_patch.models.builder import (ATTENTION_IMPLS, MOE_DISPATCHERS, TRANSFORMER_IMPLS,
                                           resolve_transformer_impl)
from megatron_patch.models.config import ModelArgs, layer_pattern
from megatron_patch.parallel import LayoutError, ParallelLayout, check_virtual_stages
from megatron_patch.training import context_parallel, lora, megatron_lm_flags
from megatron_patch.training.config import (BatchSettings, CheckpointSettings, DataSettings, LoggingSettings,
                                            ModelBuild, OptimizerSettings, RunConfig, ScheduleSettings)


class ArgumentError(ValueError):
    """An inconsistent or invalid combination of arguments (the message names it)."""


class _Parser(argparse.ArgumentParser):
    """Unknown or malformed flags become ``ArgumentError`` (one ``error:`` line), not argparse's usage dump."""

    def error(self, message: str):
        raise ArgumentError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m megatron_patch.pretrain",
        description="Pretrain or fine-tune (--sft) Llama/Qwen models on upstream megatron-core.",
    )
    g = p.add_argument_group("model")
    g.add_argument("--model-config", help="HF config.json (or a directory holding one) to train from scratch; "
                   "without it the architecture comes from the --load checkpoint")
    g.add_argument("--transformer-impl", default="auto", choices=TRANSFORMER_IMPLS,
                   help="layer implementation: Transformer Engine on GPU when installed, else megatron's local one")
    g.add_argument("--rope-impl", default="auto", choices=ROPE_IMPLS,
                   help="RoPE kernel (auto picks the fastest available)")
    g.add_argument("--attention-impl", default="auto", choices=ATTENTION_IMPLS,
                   help="core attention of the local spec: torch SDPA (auto) or megatron's unfused DotProductAttention")
    g.add_argument("--liger-kernels", default="auto", metavar="auto|none|KERNELS",
                   help="Liger-Kernel's Triton kernels in the local spec (a comma list of swiglu, cross_entropy): "
                        "auto uses both on CUDA GPUs where liger-kernel is installed, none never")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="pad the vocabulary to a multiple of this times TP")
    g.add_argument("--hidden-dropout", type=float, default=0.0,
                   help="dropout after attention and MLP (Megatron-LM's default is 0.1; HF models train with 0)")
    g.add_argument("--attention-dropout", type=float, default=0.0, help="dropout on the attention probabilities")

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1, help="tensor-parallel size (TP)")
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="pipeline-parallel size (PP)")
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None,
                   help="layers per virtual stage: enables the interleaved 1F1B schedule (needs PP > 1)")
    g.add_argument("--decoder-first-pipeline-num-layers", type=int, default=None,
                   help="layers on the first pipeline stage (uneven split; the other stages share the rest evenly)")
    g.add_argument("--decoder-last-pipeline-num-layers", type=int, default=None,
                   help="layers on the last pipeline stage (uneven split)")
    g.add_argument("--sequence-parallel", action="store_true", help="sequence parallelism (needs TP > 1)")
    context_parallel.add_flags(g)
    g.add_argument("--expert-model-parallel-size", type=int, default=1,
                   help="expert-parallel size (EP, MoE models): experts split over EP ranks, carved out of DP")
    g.add_argument("--expert-tensor-parallel-size", type=int, default=None,
                   help="tensor-parallel size of the experts (ETP, MoE models; default: TP)")

    g = p.add_argument_group("mixture of experts (architecture flags must agree with the model when given)")
    g.add_argument("--num-experts", type=int, default=None, help="number of experts (architecture)")
    g.add_argument("--moe-ffn-hidden-size", type=int, default=None, help="expert MLP width (architecture)")
    g.add_argument("--moe-router-topk", type=int, default=None, help="experts per token (architecture)")
    g.add_argument("--moe-layer-freq", default=None,
                   help="MoE layer pattern (architecture): N (every N-th layer) or a list such as [1,0,1,1]")
    g.add_argument("--moe-token-dispatcher-type", default="alltoall", choices=MOE_DISPATCHERS,
                   help="how tokens reach experts on other EP ranks (flex needs DeepEP on GPUs)")
    g.add_argument("--moe-aux-loss-coeff", type=float, default=None,
                   help="load-balancing loss coefficient (default: the model's router_aux_loss_coef)")
    g.add_argument("--moe-router-load-balancing-type", default="aux_loss",
                   choices=["aux_loss", "seq_aux_loss", "global_aux_loss", "none"],
                   help="load-balancing loss: per micro-batch (aux_loss, HF's granularity), per sequence, global, none")
    g.add_argument("--moe-grouped-gemm", action=argparse.BooleanOptionalAction, default=None,
                   help="experts as grouped GEMMs: Transformer Engine's grouped MLP on TE layers (always), torch's "
                        "grouped_mm on the local spec (default there: on for bf16 on GPUs with torch's fused grouped "
                        "GEMM, sm90+; --no-moe-grouped-gemm: megatron's SequentialMLP)")

    g = p.add_argument_group("batch")
    g.add_argument("--micro-batch-size", type=int, default=1, help="samples per micro-batch per data-parallel rank")
    g.add_argument("--global-batch-size", type=int, default=None,
                   help="samples per optimizer step over all data-parallel ranks (default: micro x DP)")
    g.add_argument("--seq-length", type=int, default=1024, help="tokens per sample")

    g = p.add_argument_group("optimizer and schedule")
    g.add_argument("--optimizer", default="adam", choices=["adam", "sgd"],
                   help="adam (AdamW: decoupled weight decay) or sgd with momentum (megatron-core's optimizers)")
    g.add_argument("--sgd-momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--lr", type=float, default=1e-4, help="peak learning rate")
    g.add_argument("--min-lr", type=float, default=0.0, help="learning rate at the end of decay")
    g.add_argument("--lr-decay-style", default="cosine", choices=["cosine", "linear", "constant", "WSD"],
                   help="learning-rate decay after warmup")
    g.add_argument("--lr-warmup-iters", type=int, default=0, help="linear warmup iterations")
    g.add_argument("--lr-decay-iters", type=int, default=None, help="decay iterations (default: --train-iters)")
    g.add_argument("--lr-wsd-decay-iters", type=int, default=None,
                   help="WSD: iterations of the final decay phase (default: 10%% of --train-iters)")
    g.add_argument("--lr-wsd-decay-style", default="exponential",
                   choices=["exponential", "linear", "cosine", "minus_sqrt"], help="WSD: shape of the final decay")
    g.add_argument("--train-iters", type=int, required=True, help="total optimizer steps")
    g.add_argument("--weight-decay", type=float, default=0.01, help="decoupled weight decay")
    g.add_argument("--clip-grad", type=float, default=1.0, help="gradient-norm clipping (0 disables)")
    g.add_argument("--adam-beta1", type=float, default=0.9, help="Adam beta1")
    g.add_argument("--adam-beta2", type=float, default=0.999, help="Adam beta2")
    g.add_argument("--adam-eps", type=float, default=1e-8, help="Adam epsilon")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="shard optimizer state over data-parallel ranks (ZeRO-1)")
    g.add_argument("--override-opt_param-scheduler", action="store_true",
                   help="on resume, use the schedule given here (--lr, --min-lr, warmup, decay) instead of the "
                   "checkpoint's; without this or the next flag a changed schedule is refused")
    g.add_argument("--use-checkpoint-opt_param-scheduler", action="store_true",
                   help="on resume, keep the checkpoint's schedule and ignore the one given here")

    g = p.add_argument_group("precision")
    g.add_argument("--bf16", action="store_true", help="bfloat16 parameters with fp32 main weights (GPU)")
    g.add_argument("--fp16", action="store_true", help="float16 parameters with dynamic loss scaling (GPU)")

    g = p.add_argument_group("memory")
    g.add_argument("--recompute-granularity", choices=["full", "selective"], default=None,
                   help="activation recompute: whole layers (full) or attention core (selective)")
    g.add_argument("--recompute-method", choices=["uniform", "block"], default=None,
                   help="full recompute: how layers are grouped")
    g.add_argument("--recompute-num-layers", type=int, default=None, help="full recompute: layers per group/block")

    g = p.add_argument_group("checkpointing")
    g.add_argument("--load", help="checkpoint directory to start from (converted or trained)")
    g.add_argument("--save", help="checkpoint directory to write")
    g.add_argument("--save-interval", type=int, default=None, help="save every N iterations (and at the end)")
    g.add_argument("--ckpt-format", default="torch", choices=CKPT_FORMATS,
                   help="format of saved checkpoints")
    g.add_argument("--save-hf", default=None,
                   help="also write a HF directory (safetensors + config + tokenizer) here at the end of training")
    g.add_argument("--save-hf-interval", type=int, default=None,
                   help="with --save-hf: write it every N iterations too (the directory is replaced each time)")
    g.add_argument("--finetune", action="store_true",
                   help="load weights only from --load; start at iteration 0 with fresh optimizer")
    g.add_argument("--no-load-optim", action="store_true", help="do not load optimizer and scheduler state")
    g.add_argument("--no-load-rng", action="store_true", help="do not load RNG state")
    g.add_argument("--exit-interval", type=int, default=None,
                   help="stop (after saving) once the iteration is a multiple of this")

    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", default=None,
                   help="indexed dataset prefixes, optionally weighted: 'W1 PREFIX1 W2 PREFIX2' (SFT: JSONL files)")
    g.add_argument("--split", default="969,30,1", help="train,valid,test proportions")
    g.add_argument("--tokenizer-type", default="HuggingFaceTokenizer", choices=["HuggingFaceTokenizer"],
                   help="tokenizer kind")
    g.add_argument("--tokenizer-model", help="HF tokenizer directory")
    g.add_argument("--data-cache-path", default=None, help="where GPTDataset caches its indices")
    g.add_argument("--mock-data", action="store_true", help="random tokens instead of --data-path (smoke tests)")

    g = p.add_argument_group("sft")
    g.add_argument("--sft", action="store_true", help="supervised fine-tuning on JSONL chat data")
    g.add_argument("--sft-pack-sequences", action="store_true",
                   help="pack several conversations per sample (attention kept within each)")

    g = p.add_argument_group("logging")
    g.add_argument("--log-interval", type=int, default=10, help="log every N iterations")
    g.add_argument("--tensorboard-dir", default=None, help="write TensorBoard events here")
    g.add_argument("--eval-interval", type=int, default=None, help="evaluate every N iterations")
    g.add_argument("--eval-iters", type=int, default=10, help="batches per evaluation")
    g.add_argument("--metrics-file", default=None, help="append one JSON line per iteration here (last rank)")

    g = p.add_argument_group("misc")
    g.add_argument("--seed", type=int, default=1234, help="random seed")
    g.add_argument("--check-for-nan-in-loss-and-grad", action=argparse.BooleanOptionalAction, default=True,
                   help="stop with an error (saving nothing) when the loss or a gradient is NaN/Inf (default on)")
    lora.add_flags(p)
    megatron_lm_flags.add_flags(p)  # Megatron-LM's flags: checked, translated, or refused by name
    return p


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def layout_of(a: argparse.Namespace, vpp: Optional[int] = None) -> ParallelLayout:
    """The parallel layout the flags give (``vpp``: the number of virtual stages, known once the model is)."""
    return ParallelLayout(tp=a.tensor_model_parallel_size, pp=a.pipeline_model_parallel_size, vpp=vpp,
                          cp=a.context_parallel_size, ep=a.expert_model_parallel_size,
                          etp=a.expert_tensor_parallel_size,
                          first_stage_layers=a.decoder_first_pipeline_num_layers,
                          last_stage_layers=a.decoder_last_pipeline_num_layers,
                          sequence_parallel=a.sequence_parallel, world=a.world_size)


def validate(a: argparse.Namespace, world_size: Optional[int] = None) -> argparse.Namespace:
    """Check what needs no model and fill derived fields (``world_size``, ``global_batch_size``...)."""
    problem = megatron_lm_flags.validate(a, torch_cuda())
    if problem:
        raise ArgumentError(problem)
    megatron_lm_flags.normalize(a)
    a.world_size = world_size or _world_size()
    for name in ("micro_batch_size", "seq_length", "train_iters", "log_interval", "make_vocab_size_divisible_by"):
        if getattr(a, name) < 1:
            raise ArgumentError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    per = a.num_layers_per_virtual_pipeline_stage
    try:
        check_virtual_stages(a.pipeline_model_parallel_size, per is not None)
        layout = layout_of(a)
        layout.check(seq_length=a.seq_length)
    except LayoutError as e:
        raise ArgumentError(str(e)) from None
    if per is not None and per < 1:
        raise ArgumentError("--num-layers-per-virtual-pipeline-stage must be >= 1")
    dp, mbs = layout.dp, a.micro_batch_size
    if a.global_batch_size is None:
        a.global_batch_size = mbs * dp
    if a.global_batch_size % (mbs * dp):
        raise ArgumentError(f"--global-batch-size {a.global_batch_size} is not divisible by micro-batch size "
                            f"({mbs}) x data-parallel size ({dp})")
    a.num_microbatches = a.global_batch_size // (mbs * dp)
    try:
        impl = resolve_transformer_impl(a.transformer_impl)
    except ValueError as e:
        raise ArgumentError(str(e)) from None
    problem = context_parallel.check(a, impl)
    if problem:
        raise ArgumentError(problem)
    if a.moe_grouped_gemm is False and impl == "transformer_engine":
        raise ArgumentError("--no-moe-grouped-gemm: Transformer Engine layers always run TE's grouped MLP "
                            "(use --transformer-impl local for megatron's SequentialMLP)")
    if a.moe_grouped_gemm is None:  # the default: TE's grouped MLP, or torch's where it is a fused kernel
        import torch

        from megatron_patch.models.builder import default_moe_grouped_gemm

        a.moe_grouped_gemm = impl == "transformer_engine" or default_moe_grouped_gemm(
            torch.bfloat16 if a.bf16 else torch.float16 if a.fp16 else torch.float32)
    fusion_settings(a)  # refuses Liger kernels that cannot run here or contradict megatron's fusion flags
    if a.moe_token_dispatcher_type == "flex" and not torch_cuda():
        raise ArgumentError("--moe-token-dispatcher-type flex needs DeepEP on CUDA GPUs; use alltoall or allgather")
    if a.moe_layer_freq is not None:
        a.moe_layer_freq = parse_layer_freq(a.moe_layer_freq)
    if a.bf16 and a.fp16:
        raise ArgumentError("--bf16 and --fp16 are mutually exclusive")
    if a.optimizer == "sgd" and a.use_distributed_optimizer:
        raise ArgumentError("--optimizer sgd cannot be used with --use-distributed-optimizer: megatron-core's "
                            "distributed optimizer shards Adam only")
    if a.recompute_granularity == "full" and a.recompute_method is None:
        raise ArgumentError("--recompute-granularity full needs --recompute-method uniform|block")
    if a.recompute_method and a.recompute_granularity != "full":
        raise ArgumentError("--recompute-method only applies with --recompute-granularity full")
    if a.recompute_method and a.recompute_num_layers is None:
        a.recompute_num_layers = 1
    if a.lr < 0 or a.min_lr < 0 or a.min_lr > a.lr:
        raise ArgumentError(f"need 0 <= --min-lr ({a.min_lr}) <= --lr ({a.lr})")
    decay = a.lr_decay_iters or a.train_iters  # as state.scheduler_settings; megatron-core asserts warmup < decay
    if a.lr_warmup_iters < 0 or decay < 1 or a.lr_warmup_iters >= decay:
        raise ArgumentError(f"--lr-warmup-iters {a.lr_warmup_iters} must lie in [0, {decay}) and the decay "
                            f"iterations ({decay}: --lr-decay-iters, default --train-iters) be >= 1")
    if a.weight_decay < 0:
        raise ArgumentError(f"--weight-decay must be >= 0, got {a.weight_decay}")
    try:
        data_checks.parse_split(a.split)
    except ValueError as e:
        raise ArgumentError(str(e)) from None
    if a.model_config is None and a.load is None:
        raise ArgumentError("give --model-config (train from scratch) or --load (start from a checkpoint)")
    if a.finetune and a.load is None:
        raise ArgumentError("--finetune needs --load")
    if a.save_interval is not None and (a.save_interval < 1 or a.save is None):
        raise ArgumentError("--save-interval needs --save and must be >= 1")
    if a.save_hf_interval is not None and (a.save_hf_interval < 1 or a.save_hf is None):
        raise ArgumentError("--save-hf-interval needs --save-hf and must be >= 1")
    if not a.mock_data:
        if not a.data_path and not a.train_data_path:
            raise ArgumentError("give --data-path (or --mock-data)")
        if a.tokenizer_model is None:
            # The dataset needs EOD and the vocab size; SFT needs the chat template.
            raise ArgumentError("--tokenizer-model is required with --data-path")
    if a.sft_pack_sequences and not a.sft:
        raise ArgumentError("--sft-pack-sequences needs --sft")
    if a.sft_pack_sequences and impl == "transformer_engine":
        raise ArgumentError("--sft-pack-sequences uses an explicit attention mask, which the Transformer Engine "
                            "layers here do not take; add --transformer-impl local")
    if a.eval_interval is not None and a.eval_interval < 1:
        raise ArgumentError("--eval-interval must be >= 1")
    for name in ("hidden_dropout", "attention_dropout"):
        if not 0.0 <= getattr(a, name) < 1.0:
            raise ArgumentError(f"--{name.replace('_', '-')} must lie in [0, 1), got {getattr(a, name)}")
    if a.override_opt_param_scheduler and a.use_checkpoint_opt_param_scheduler:
        raise ArgumentError("--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler are mutually "
                            "exclusive")
    lora.validate(a)
    return a


def fusion_settings(a: argparse.Namespace) -> dict:
    """``ModelBuild``'s Liger kernels and SDPA kernel preference from the flags.

    ``--liger-kernels auto`` takes Liger's SwiGLU and cross entropy on the local spec on a GPU, except where
    a Megatron-LM flag asks for megatron's own path (``--no-bias-swiglu-fusion``: unfused SwiGLU;
    ``--cross-entropy-loss-fusion``: megatron's fused cross entropy); naming a kernel that such a flag
    contradicts is an error. ``--attention-backend`` (Transformer Engine's choice on TE layers) picks SDPA's
    kernel on the local spec: fused = cuDNN, flash = FlashAttention-2, unfused/local = the math kernel.
    """
    from megatron_patch.fusions import liger

    try:
        kernels = set(liger.resolve(a.liger_kernels))
    except ValueError as e:
        raise ArgumentError(f"--liger-kernels: {e}") from None
    off = {"swiglu": "--no-bias-swiglu-fusion" if getattr(a, "no_bias_swiglu_fusion", False) else None,
           "cross_entropy": "--cross-entropy-loss-fusion" if getattr(a, "cross_entropy_loss_fusion", False) else None}
    if a.liger_kernels == "auto":
        local = resolve_transformer_impl(a.transformer_impl) == "local"
        kernels = {k for k in kernels if local and not off[k]}
    for k in sorted(kernels):
        if off[k]:
            raise ArgumentError(f"--liger-kernels {a.liger_kernels} asks for Liger's {k}, which {off[k]} turns off; "
                                "drop one of the two")
    backend = a.attention_backend or "auto"
    return dict(liger_kernels=frozenset(kernels), sdpa_backend="unfused" if backend == "local" else backend)


def torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def parse_layer_freq(text: str):
    """``--moe-layer-freq``: an int N, or a list literal of 0/1 (read with ``ast.literal_eval``, never eval)."""
    import ast

    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        raise ArgumentError(f"--moe-layer-freq {text!r} is neither an integer nor a list like [1,0,1,1]") from None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    if isinstance(value, (list, tuple)) and value and all(v in (0, 1) and not isinstance(v, bool) for v in value):
        return list(value)
    raise ArgumentError(f"--moe-layer-freq {text!r} must be an integer >= 1 or a list of 0/1")


# Trainer flag -> ModelArgs field: architecture flags that, when given, must agree with the model.
ARCHITECTURE_FLAGS = {
    "num_experts": "num_experts",
    "moe_ffn_hidden_size": "moe_ffn_hidden_size",
    "moe_router_topk": "moe_router_topk",
}


def check_architecture_flags(a: argparse.Namespace, margs: ModelArgs) -> None:
    """One error listing every architecture flag that disagrees with the model (checkpoint or config)."""
    wrong = megatron_lm_flags.architecture_disagreements(a, margs)
    for flag, field in ARCHITECTURE_FLAGS.items():
        given = getattr(a, flag)
        if given is not None and given != getattr(margs, field):
            wrong.append(f"--{flag.replace('_', '-')} {given} (model: {getattr(margs, field)})")
    if a.moe_layer_freq is not None and layer_pattern(a.moe_layer_freq, margs.num_layers) != margs.moe_layer_pattern:
        wrong.append(f"--moe-layer-freq {a.moe_layer_freq} (model: {margs.moe_layer_pattern})")
    if wrong:
        raise ArgumentError("architecture flags disagree with the model: " + "; ".join(wrong))


def run_config(a: argparse.Namespace, margs: ModelArgs, resume=None, hf_source=None,
               hf_config: Optional[dict] = None) -> RunConfig:
    """The run configuration of parsed arguments for the model ``margs``, with every check that needs the model.

    ``resume`` / ``hf_source``: the opened ``--load`` (a Megatron checkpoint's ``CheckpointInfo``, a HF
    directory's ``HFSource``); ``hf_config``: the run's HF config.json.
    """
    per = a.num_layers_per_virtual_pipeline_stage
    vpp = None
    if per is not None:
        pp = a.pipeline_model_parallel_size
        if margs.num_layers % (per * pp):
            raise ArgumentError(f"{margs.num_layers} layers cannot be split into PP={pp} stages of virtual stages "
                                f"with {per} layers each")
        vpp = margs.num_layers // (per * pp)
    check_architecture_flags(a, margs)
    layout = layout_of(a, vpp)
    try:
        layout.check(margs, seq_length=a.seq_length, training=True)
    except LayoutError as e:
        raise ArgumentError(str(e)) from None
    padded = margs.padded_vocab_size(a.make_vocab_size_divisible_by, layout.tp)
    if a.padded_vocab_size is not None and a.padded_vocab_size != padded:
        raise ArgumentError(f"--padded-vocab-size {a.padded_vocab_size} is not the model's vocab ({margs.vocab_size}) "
                            f"padded to a multiple of --make-vocab-size-divisible-by ({a.make_vocab_size_divisible_by})"
                            f" x TP ({layout.tp}), which is {padded}")
    return RunConfig(
        model=margs, layout=layout,
        params_dtype=dtypes.BY_NAME["bf16" if a.bf16 else "fp16" if a.fp16 else "fp32"],
        build=ModelBuild(
            transformer_impl=a.transformer_impl, rope_impl=a.rope_impl, attention_impl=a.attention_impl,
            make_vocab_size_divisible_by=a.make_vocab_size_divisible_by, hidden_dropout=a.hidden_dropout,
            attention_dropout=a.attention_dropout, moe_token_dispatcher_type=a.moe_token_dispatcher_type,
            moe_aux_loss_coeff=a.moe_aux_loss_coeff, moe_router_load_balancing_type=a.moe_router_load_balancing_type,
            moe_grouped_gemm=a.moe_grouped_gemm, cp_comm_type=context_parallel.comm_type(a), **fusion_settings(a),
            transformer_overrides=dict(
                recompute_granularity=a.recompute_granularity, recompute_method=a.recompute_method,
                recompute_num_layers=a.recompute_num_layers, **megatron_lm_flags.transformer_overrides(a))),
        batch=BatchSettings(micro_batch_size=a.micro_batch_size, global_batch_size=a.global_batch_size,
                            seq_length=a.seq_length, num_microbatches=a.num_microbatches),
        optimizer=OptimizerSettings(
            optimizer=a.optimizer, lr=a.lr, min_lr=a.min_lr, weight_decay=a.weight_decay, clip_grad=a.clip_grad,
            adam_beta1=a.adam_beta1, adam_beta2=a.adam_beta2, adam_eps=a.adam_eps, sgd_momentum=a.sgd_momentum,
            use_distributed_optimizer=a.use_distributed_optimizer,
            ddp_overrides=megatron_lm_flags.ddp_overrides(a),
            config_overrides=megatron_lm_flags.optimizer_overrides(a)),
        schedule=ScheduleSettings(
            train_iters=a.train_iters, lr_warmup_iters=a.lr_warmup_iters, lr_decay_iters=a.lr_decay_iters,
            lr_decay_style=a.lr_decay_style, lr_wsd_decay_iters=a.lr_wsd_decay_iters,
            lr_wsd_decay_style=a.lr_wsd_decay_style, override_opt_param_scheduler=a.override_opt_param_scheduler,
            use_checkpoint_opt_param_scheduler=a.use_checkpoint_opt_param_scheduler, exit_interval=a.exit_interval,
            eval_interval=a.eval_interval, eval_iters=a.eval_iters),
        data=data_settings(a),
        checkpoint=CheckpointSettings(
            load=a.load, save=a.save, save_interval=a.save_interval, ckpt_format=a.ckpt_format, save_hf=a.save_hf,
            save_hf_interval=a.save_hf_interval, finetune=a.finetune, no_load_optim=a.no_load_optim,
            no_load_rng=a.no_load_rng, no_save_optim=a.no_save_optim, hf_config_path=a.hf_config),
        logging=logging_settings(a),
        seed=a.seed, check_for_nan_in_loss_and_grad=a.check_for_nan_in_loss_and_grad,
        resume=resume, hf_source=hf_source, hf_config=hf_config, lora=lora.settings(a, margs),
    )


def data_settings(a: argparse.Namespace) -> DataSettings:
    """The data flags (Megatron-LM's per-split paths, document-end resets, loader options included)."""
    return DataSettings(
        mock=a.mock_data, data_path=tuple(a.data_path or ()), split=a.split,
        train_data_path=tuple(a.train_data_path or ()), valid_data_path=tuple(a.valid_data_path or ()),
        tokenizer_model=a.tokenizer_model, data_cache_path=a.data_cache_path, sft=a.sft,
        sft_pack_sequences=a.sft_pack_sequences, dataloader_type=a.dataloader_type, num_workers=a.num_workers,
        reset_position_ids=a.reset_position_ids, reset_attention_mask=a.reset_attention_mask,
        eod_mask_loss=a.eod_mask_loss)


def logging_settings(a: argparse.Namespace) -> LoggingSettings:
    """The logging flags (metrics file, TensorBoard and wandb, as in Megatron-LM)."""
    return LoggingSettings(
        log_interval=a.log_interval, metrics_file=a.metrics_file, tensorboard_dir=a.tensorboard_dir,
        tensorboard_queue_size=a.tensorboard_queue_size, log_timers_to_tensorboard=a.log_timers_to_tensorboard,
        log_validation_ppl_to_tensorboard=a.log_validation_ppl_to_tensorboard,
        log_batch_size_to_tensorboard=a.log_batch_size_to_tensorboard, log_throughput=a.log_throughput,
        wandb_project=a.wandb_project, wandb_exp_name=a.wandb_exp_name, wandb_save_dir=a.wandb_save_dir)


def parse_args(argv: Optional[Sequence[str]] = None, world_size: Optional[int] = None) -> argparse.Namespace:
    """Parse and validate; ``ArgumentError`` on inconsistent combinations."""
    return validate(build_parser().parse_args(argv), world_size)


def parse_blend(paths: Sequence[str]) -> tuple[list[str], Optional[list[float]]]:
    """``[W1, P1, W2, P2]`` -> (prefixes, weights); ``[P1, P2]`` -> (prefixes, None)."""
    def is_number(s: str) -> bool:
        try:
            float(s)
            return True
        except ValueError:
            return False

    if len(paths) > 1 and is_number(paths[0]):
        if len(paths) % 2:
            raise ArgumentError("--data-path with weights needs pairs: W1 PREFIX1 W2 PREFIX2 ...")
        weights, prefixes = paths[0::2], paths[1::2]
        bad = [w for w in weights if not is_number(w)]
        if bad:
            raise ArgumentError(f"--data-path weight {bad[0]!r} is not a number")
        w = [float(x) for x in weights]
        if any(x < 0 for x in w) or sum(w) <= 0:
            raise ArgumentError("--data-path weights must be non-negative and not all zero")
        return list(prefixes), w
    return list(paths), None
