"""Megatron-LM's flags in this project's trainer, and what each one becomes in megatron-core's configs.

Scripts written for Megatron-LM (or Pai-Megatron-Patch) pass flags this trainer would otherwise not know. Four
kinds, each handled here in one place:

- architecture flags (``--num-layers``, ``--hidden-size``, ``--norm-epsilon``, ``--qk-layernorm``, ...; the rows of
  the field table in ``models/config.py`` plus rope and what these families always are): the model comes from
  the checkpoint or ``--model-config``; given flags must agree with it, and one error lists every disagreement
  (``architecture_disagreements``, used by ``arguments.check_architecture_flags``).
- training flags (dropouts, ``--init-method-std``, overlapped gradient reduce / parameter gather, loss masking
  and position resets at document ends, per-split data paths, ``--dataloader-type``, ``--num-workers``,
  ``--no-save-optim``, ``--recompute-activations``, logging and wandb flags): translated into
  ``TransformerConfig`` / ``DistributedDataParallelConfig`` / ``OptimizerConfig`` keyword arguments
  (``transformer_overrides``, ``ddp_overrides``, ``optimizer_overrides``) or read by the data and logging code.
- GPU-only flags (FP8, TP communication overlap, attention backend, CUDA graphs, fused cross entropy): translated
  the same way on a GPU, refused on CPU with one error line.
- Megatron-LM flags deliberately not supported: refused by name with the reason (``UNSUPPORTED``), never ignored.
"""

from __future__ import annotations

import argparse
from typing import Any, Optional

# Architecture flags beyond the field table (``models/config.py``, whose dense rows are flags too: ``Field.flag``):
# argparse dest -> the model's value.
_ARCHITECTURE_EXTRA = {
    "rotary_base": lambda m: m.rope.theta,
    "use_rope_scaling": lambda m: m.rope.rope_type == "llama3",
    "rope_scaling_factor": lambda m: m.rope.factor if m.rope.rope_type == "llama3" else None,
    # What these models always are.
    "position_embedding_type": lambda m: "rope",
    "use_rotary_position_embeddings": lambda m: True,
    "swiglu": lambda m: True,
    "normalization": lambda m: "RMSNorm",
    "disable_bias_linear": lambda m: True,
}


def _table_fields():
    """The field-table rows that are architecture flags. ``vocab_size`` is not (Megatron-LM's is a tokenizer
    argument), ``num_query_groups`` goes with ``--group-query-attention``, MoE rows are ``arguments``' own."""
    from megatron_patch.models.config import FIELDS

    return [f for f in FIELDS if not f.moe and f.name not in ("vocab_size", "num_query_groups")]


def architecture_flags() -> dict:
    """Every architecture flag (argparse dest) -> a function of ``ModelArgs`` giving the model's value."""
    out = {f.name: (lambda m, n=f.name: getattr(m, n)) for f in _table_fields()}
    out.update(_ARCHITECTURE_EXTRA)
    return out


# Megatron-LM flags this trainer refuses, with the reason (a flag given is never silently ignored).
UNSUPPORTED = {
    "--use-legacy-models": "only megatron-core's GPTModel is built",
    "--yaml-cfg": "flags are given on the command line (and checked) here",
    "--spec": "the layer spec follows the model family (Transformer Engine or megatron's local layers)",
    "--use-torch-fsdp2": "FSDP is not supported; use the distributed optimizer (--use-distributed-optimizer)",
    "--use-megatron-fsdp": "FSDP is not supported; use the distributed optimizer (--use-distributed-optimizer)",
    "--data-parallel-random-init": "data-parallel replicas start from the same weights here",
    "--multi-latent-attention": "no supported family uses multi-latent attention",
    "--mtp-num-layers": "multi-token prediction is not supported",
    "--apply-layernorm-1p": "the supported families use plain RMSNorm",
    "--squared-relu": "the supported families use SwiGLU",
    "--vocab-file": "the tokenizer is a HF tokenizer directory (--tokenizer-model)",
    "--merge-file": "the tokenizer is a HF tokenizer directory (--tokenizer-model)",
    "--test-data-path": "no test split is evaluated here",
    "--rotary-seq-len-interpolation-factor": "rope scaling comes from the model's HF config",
    "--fp8-param-gather": "FP8 parameters are not supported",
    "--fp4-format": "FP4 is not supported",
}

DATALOADER_TYPES = ("single", "cyclic", "external")
FP8_FORMATS = ("e4m3", "hybrid")
FP8_RECIPES = ("tensorwise", "delayed", "mxfp8", "blockwise")
ATTENTION_BACKENDS = ("flash", "fused", "unfused", "local", "auto")
CUDA_GRAPH_IMPLS = ("none", "local", "transformer_engine")


class _Refuse(argparse.Action):
    """Records an unsupported Megatron-LM flag; ``validate`` refuses it with the reason."""

    def __call__(self, parser, namespace, values, option_string=None):
        namespace.unsupported_flags = [*getattr(namespace, "unsupported_flags", []), option_string]


def _has(parser: argparse.ArgumentParser, flag: str) -> bool:
    return flag in parser._option_string_actions


def add_flags(parser: argparse.ArgumentParser) -> None:
    """Add the Megatron-LM flags this trainer did not define itself (a flag already defined is kept as is)."""

    def add(group, flag: str, **kw) -> None:
        if not _has(parser, flag):
            group.add_argument(flag, **kw)

    g = parser.add_argument_group("Megatron-LM architecture flags (checked: must agree with the model)")
    for f in _table_fields():
        if f.kind is bool:
            add(g, f.flag, action="store_true", default=None, help=f"the model has {f.name.replace('_', ' ')}")
        else:
            add(g, f.flag, type=f.kind, default=None, help=f"the model's {f.name.replace('_', ' ')}")
    add(g, "--num-query-groups", type=int, default=None, help="key/value groups (with --group-query-attention)")
    add(g, "--rotary-base", type=float, default=None, help="rope theta")
    add(g, "--rope-scaling-factor", type=float, default=None, help="llama3 rope scaling factor")
    add(g, "--position-embedding-type", default=None, help="rope (the only one these models use)")
    add(g, "--normalization", default=None, help="RMSNorm (the only one these models use)")
    for flag in ("--group-query-attention", "--swiglu", "--disable-bias-linear", "--use-rotary-position-embeddings",
                 "--use-rope-scaling"):
        add(g, flag, action="store_true", default=None, help="(checked against the model)")

    g = parser.add_argument_group("Megatron-LM training flags")
    add(g, "--hf-config", default=None, metavar="DIR",
        help="the HF config (and tokenizer) of a --load checkpoint written by Megatron-LM")
    add(g, "--hidden-dropout", type=float, default=0.0, help="dropout after attention and MLP (HF models: 0)")
    add(g, "--attention-dropout", type=float, default=0.0, help="dropout on attention probabilities")
    add(g, "--init-method-std", type=float, default=None, help="std of the normal weight init (training from scratch)")
    add(g, "--overlap-grad-reduce", action="store_true", help="overlap the gradient reduction with the backward pass")
    add(g, "--overlap-param-gather", action="store_true",
        help="overlap the distributed optimizer's parameter all-gather with the forward pass")
    add(g, "--calculate-per-token-loss", action="store_true",
        help="per-token loss over the global batch (always the case in this trainer)")
    add(g, "--eod-mask-loss", action="store_true", help="no loss on end-of-document tokens")
    add(g, "--reset-position-ids", action="store_true", help="restart position ids after each end-of-document")
    add(g, "--reset-attention-mask", action="store_true", help="no attention across end-of-document tokens")
    add(g, "--train-data-path", nargs="+", default=None, help="training data (blend) instead of --data-path + --split")
    add(g, "--valid-data-path", nargs="+", default=None, help="validation data (blend), with --train-data-path")
    add(g, "--dataloader-type", default="single", choices=DATALOADER_TYPES,
        help="single: samples in order; cyclic: a fresh shuffle every epoch")
    add(g, "--num-workers", type=int, default=0, help="data loader worker processes")
    add(g, "--no-save-optim", action="store_true", help="checkpoints without optimizer state")
    add(g, "--recompute-activations", action="store_true", help="selective activation recompute (attention core)")
    add(g, "--log-throughput", action="store_true", help="log TFLOP/s per device (on CPU too)")
    add(g, "--log-timers-to-tensorboard", action="store_true", help="write iteration times to TensorBoard")
    add(g, "--log-validation-ppl-to-tensorboard", action="store_true", help="write validation perplexity too")
    add(g, "--tensorboard-queue-size", type=int, default=1000, help="TensorBoard events buffered before a flush")
    add(g, "--wandb-project", default=None, help="log to Weights & Biases (WANDB_MODE=offline works offline)")
    add(g, "--wandb-exp-name", default=None, help="wandb run name")
    add(g, "--wandb-save-dir", default=None, help="wandb directory")

    g = parser.add_argument_group("GPU-only Megatron-LM flags (refused on CPU)")
    add(g, "--fp8-format", default=None, choices=FP8_FORMATS, help="FP8 training (Transformer Engine)")
    add(g, "--fp8-recipe", default=None, choices=FP8_RECIPES, help="FP8 scaling recipe")
    add(g, "--tp-comm-overlap", action="store_true", help="overlap TP communication with GEMMs (Transformer Engine)")
    add(g, "--attention-backend", default=None, choices=ATTENTION_BACKENDS, help="Transformer Engine attention kernel")
    add(g, "--enable-cuda-graph", action="store_true", help="CUDA graphs (megatron-core's local implementation)")
    add(g, "--cuda-graph-impl", default=None, choices=CUDA_GRAPH_IMPLS, help="CUDA graph implementation")
    add(g, "--cross-entropy-loss-fusion", action="store_true", help="fused cross entropy")
    add(g, "--cross-entropy-fusion-impl", default=None, choices=("native", "te"), help="fused cross entropy kernel")

    g = parser.add_argument_group("Megatron-LM flags refused here (the error says why)")
    for flag in UNSUPPORTED:
        add(g, flag, nargs="*", action=_Refuse, help=argparse.SUPPRESS)


def gpu_flags(a: argparse.Namespace) -> list[str]:
    """The GPU-only flags given."""
    given = [("--fp8-format", a.fp8_format), ("--fp8-recipe", a.fp8_recipe), ("--tp-comm-overlap", a.tp_comm_overlap),
             ("--attention-backend", a.attention_backend), ("--enable-cuda-graph", a.enable_cuda_graph),
             ("--cuda-graph-impl", a.cuda_graph_impl not in (None, "none")),
             ("--cross-entropy-loss-fusion", a.cross_entropy_loss_fusion),
             ("--cross-entropy-fusion-impl", a.cross_entropy_fusion_impl)]
    return [flag for flag, value in given if value]


def validate(a: argparse.Namespace, on_gpu: bool) -> Optional[str]:
    """The problem with these flags, or None (``arguments.validate`` raises it as ``ArgumentError``)."""
    refused = getattr(a, "unsupported_flags", [])
    if refused:
        return f"{refused[0]} (a Megatron-LM flag) is not supported by this trainer: {UNSUPPORTED[refused[0]]}"
    gpu = gpu_flags(a)
    if gpu and not on_gpu:
        return (f"{', '.join(gpu)} {'needs' if len(gpu) == 1 else 'need'} a CUDA GPU (Transformer Engine / fused "
                "kernels); this run is on CPU")
    if a.fp8_recipe and not a.fp8_format:
        return "--fp8-recipe needs --fp8-format"
    if a.tp_comm_overlap and not getattr(a, "sequence_parallel", False):
        return "--tp-comm-overlap needs --sequence-parallel"
    if a.overlap_param_gather and not (a.use_distributed_optimizer and a.overlap_grad_reduce):
        return "--overlap-param-gather needs --use-distributed-optimizer and --overlap-grad-reduce"
    if a.recompute_activations and a.recompute_granularity not in (None, "selective"):
        return ("--recompute-activations is --recompute-granularity selective; it contradicts "
                "--recompute-granularity full")
    if a.dataloader_type == "external":
        return "--dataloader-type external needs a user-supplied data iterator, which this trainer does not take"
    if a.num_workers < 0 or a.tensorboard_queue_size < 1:
        return "--num-workers must be >= 0 and --tensorboard-queue-size >= 1"
    if a.train_data_path and a.data_path:
        return "give either --data-path (with --split) or --train-data-path/--valid-data-path, not both"
    if a.valid_data_path and not a.train_data_path:
        return "--valid-data-path needs --train-data-path"
    if a.rope_scaling_factor is not None and not a.use_rope_scaling:
        return "--rope-scaling-factor needs --use-rope-scaling"
    if a.wandb_project is not None:
        try:
            import wandb  # noqa: F401
        except ImportError:
            return "--wandb-project needs the 'wandb' package (pip install wandb; WANDB_MODE=offline works offline)"
    return None


def normalize(a: argparse.Namespace) -> None:
    """Megatron-LM's shorthands as the flags they stand for."""
    if a.recompute_activations:
        a.recompute_granularity = "selective"


def architecture_disagreements(a: argparse.Namespace, margs) -> list[str]:
    """'--flag GIVEN (model: VALUE)' for every given architecture flag that disagrees with the model."""
    wrong = []
    for dest, model_value in architecture_flags().items():
        given = getattr(a, dest, None)
        if given is None:
            continue
        value = model_value(margs)
        same = abs(given - value) <= 1e-9 * abs(value) if isinstance(given, float) and value is not None else \
            given == value
        if not same:
            wrong.append(f"--{dest.replace('_', '-')} {given} (model: {value})")
    if a.group_query_attention or a.num_query_groups is not None:
        # Megatron-LM: without --group-query-attention every head is its own group; with it, 1 by default.
        groups = (a.num_query_groups or 1) if a.group_query_attention else a.num_attention_heads or \
            margs.num_attention_heads
        if groups != margs.num_query_groups:
            wrong.append(f"--group-query-attention/--num-query-groups mean {groups} query groups "
                         f"(model: {margs.num_query_groups})")
    return wrong


# ----------------------------------------------------------------------------- translations


def transformer_overrides(a: argparse.Namespace) -> dict[str, Any]:
    """``TransformerConfig`` keyword arguments from the flags (only those that were given or always apply)."""
    out: dict[str, Any] = {"hidden_dropout": a.hidden_dropout, "attention_dropout": a.attention_dropout}
    if a.init_method_std is not None:
        out["init_method_std"] = a.init_method_std
    if a.fp8_format:
        out["fp8"] = a.fp8_format
        out["fp8_recipe"] = a.fp8_recipe or "delayed"
    if a.tp_comm_overlap:
        out["tp_comm_overlap"] = True
    if a.attention_backend:
        from megatron.core.transformer.enums import AttnBackend

        out["attention_backend"] = AttnBackend[a.attention_backend]
    if a.enable_cuda_graph or a.cuda_graph_impl not in (None, "none"):
        out["cuda_graph_impl"] = a.cuda_graph_impl if a.cuda_graph_impl not in (None, "none") else "local"
    if a.cross_entropy_loss_fusion:
        out["cross_entropy_loss_fusion"] = True
        out["cross_entropy_fusion_impl"] = a.cross_entropy_fusion_impl or "native"
    return out


def ddp_overrides(a: argparse.Namespace) -> dict[str, Any]:
    """``DistributedDataParallelConfig`` keyword arguments from the flags."""
    return {"overlap_grad_reduce": a.overlap_grad_reduce, "overlap_param_gather": a.overlap_param_gather,
            "align_param_gather": a.overlap_param_gather}


def optimizer_overrides(a: argparse.Namespace) -> dict[str, Any]:
    """``OptimizerConfig`` keyword arguments from the flags."""
    return {"overlap_param_gather": a.overlap_param_gather}


def install_overlap_hooks(a: argparse.Namespace, config, chunks: list) -> None:
    """What megatron-core's schedules call to overlap communication (as Megatron-LM sets them up): the
    gradient reduce of each chunk starts as its backward ends; parameter gathers start before forwards."""
    def one_or_list(fns):
        return fns[0] if len(fns) == 1 else fns

    if a.overlap_grad_reduce:
        config.grad_sync_func = one_or_list([c.start_grad_sync for c in chunks])
    if a.overlap_param_gather:
        config.param_sync_func = one_or_list([c.start_param_sync for c in chunks])


def sync_params(a: argparse.Namespace, chunks: list) -> None:
    """With the parameter gather overlapped, the last optimizer step's all-gather is still pending: finish it
    (before a checkpoint is written, so the saved weights are the updated ones)."""
    if getattr(a, "overlap_param_gather", False):
        for c in chunks:
            c.start_param_sync(force_sync=True)
