"""Megatron-LM's flags in this project's trainer, and what each one becomes in megatron-core's configs.

Scripts written for Megatron-LM (or Pai-Megatron-Patch) pass flags this trainer would otherwise not know. Four
kinds, each handled here in one place, at the command-line edge (these functions read the parsed namespace;
what they return goes into the typed ``RunConfig``):

- architecture flags (``--num-layers``, ``--hidden-size``, ``--norm-epsilon``, ``--qk-layernorm``,
  ``--rotary-percent``, ...; the rows of the field table in ``models/config.py`` plus rope and what these families
  always are, ``FIXED_ARCHITECTURE``): the model comes from the checkpoint or ``--model-config``; given flags must
  agree with it, and one error lists every disagreement (``architecture_disagreements``, used by
  ``arguments.check_architecture_flags``).
- training flags (dropouts, ``--init-method-std``, overlapped gradient reduce / parameter gather / pipeline
  exchanges, fusion switches, ``--apply-query-key-layer-scaling``, loss masking and position resets at document
  ends, per-split data paths, ``--dataloader-type``, ``--num-workers``, ``--no-save-optim``,
  ``--recompute-activations``, logging and wandb flags): translated into ``TransformerConfig`` /
  ``DistributedDataParallelConfig`` / ``OptimizerConfig`` keyword arguments (``transformer_overrides``,
  ``ddp_overrides``, ``optimizer_overrides``) or into the data and logging settings.
- GPU-only flags (FP8 and its amax history, TP communication overlap, attention backend, CUDA graphs and their
  scope, Transformer Engine's RNG tracker, fused cross entropy, activation and optimizer CPU offload): translated
  the same way on a GPU, refused on CPU with one error line; those megatron-core serves only with Transformer
  Engine are refused without it, naming it.
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
}
# The flags of what these families always are (``FIXED_ARCHITECTURE``, Megatron-LM's names), and their spellings
# as flags where they differ from the args.
_FIXED_FLAGS = ("swiglu", "normalization", "position_embedding_type", "rotary_percent")
_FIXED_DERIVED = {
    "disable_bias_linear": lambda fixed: not fixed["add_bias_linear"],
    "use_rotary_position_embeddings": lambda fixed: fixed["position_embedding_type"] == "rope",
}


def _table_fields():
    """The field-table rows that are architecture flags. ``vocab_size`` is not (Megatron-LM's is a tokenizer
    argument), ``num_query_groups`` goes with ``--group-query-attention``, MoE rows are ``arguments``' own."""
    from megatron_patch.models.config import FIELDS

    return [f for f in FIELDS if not f.moe and f.name not in ("vocab_size", "num_query_groups")]


def fixed_flags() -> dict:
    """The architecture flags (argparse dest) whose value is the same for every supported model -> that value."""
    from megatron_patch.models.config import FIXED_ARCHITECTURE

    out = {dest: FIXED_ARCHITECTURE[dest] for dest in _FIXED_FLAGS}
    out.update({dest: value(FIXED_ARCHITECTURE) for dest, value in _FIXED_DERIVED.items()})
    return out


def architecture_flags() -> dict:
    """Every architecture flag (argparse dest) -> a function of ``ModelArgs`` giving the model's value."""
    out = {f.name: (lambda m, n=f.name: getattr(m, n)) for f in _table_fields()}
    out.update(_ARCHITECTURE_EXTRA)
    out.update({dest: (lambda m, v=value: v) for dest, value in fixed_flags().items()})
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
FP8_AMAX_ALGOS = ("most_recent", "max")
ATTENTION_BACKENDS = ("flash", "fused", "unfused", "local", "auto")
CUDA_GRAPH_IMPLS = ("none", "local", "transformer_engine")
# megatron-core's CudaGraphScope names ("full": the whole layer, Megatron-LM's spelling of an empty scope).
CUDA_GRAPH_SCOPES = ("full", "full_iteration", "attn", "mlp", "moe", "moe_router", "moe_preprocess", "mamba")


class _Refuse(argparse.Action):
    """Records an unsupported Megatron-LM flag; ``validate`` refuses it with the reason."""

    def __call__(self, parser, namespace, values, option_string=None):
        namespace.unsupported_flags = [*namespace.unsupported_flags, option_string]


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
    add(g, "--rotary-percent", type=float, default=None,
        help="fraction of the head dimension rotated: 1.0 (these families rotate all of it)")
    for flag in ("--group-query-attention", "--swiglu", "--disable-bias-linear", "--use-rotary-position-embeddings",
                 "--use-rope-scaling"):
        add(g, flag, action="store_true", default=None, help="(checked against the model)")

    g = parser.add_argument_group("Megatron-LM training flags")
    add(g, "--hf-config", default=None, metavar="DIR",
        help="the HF config (and tokenizer) of a --load checkpoint written by Megatron-LM")
    add(g, "--init-method-std", type=float, default=None, help="std of the normal weight init (training from scratch)")
    add(g, "--overlap-grad-reduce", action="store_true", help="overlap the gradient reduction with the backward pass")
    add(g, "--overlap-param-gather", action="store_true",
        help="overlap the distributed optimizer's parameter all-gather with the forward pass")
    add(g, "--no-overlap-p2p-communication", dest="overlap_p2p_comm", action="store_false",
        help="with virtual pipeline stages: batched pipeline sends/receives instead of overlapped ones (needs "
        "--pipeline-model-parallel-size > 2)")
    add(g, "--calculate-per-token-loss", action="store_true",
        help="per-token loss over the global batch (always the case in this trainer)")
    add(g, "--no-rope-fusion", action="store_true", help="unfused RoPE: the same as --rope-impl torch")
    add(g, "--no-bias-swiglu-fusion", action="store_true",
        help="megatron's SwiGLU without its fused kernel (TransformerConfig.bias_activation_fusion; off on CPU anyway)")
    add(g, "--apply-query-key-layer-scaling", action="store_true",
        help="scale Q.K by 1/layer number inside megatron's DotProductAttention and back in its softmax (an fp16 "
        "overflow guard with the same result; the default SDPA core attention keeps its softmax stable itself)")
    add(g, "--padded-vocab-size", type=int, default=None,
        help="the padded vocabulary: checked against the model's vocab padded to --make-vocab-size-divisible-by x TP")
    add(g, "--eod-mask-loss", action="store_true", help="no loss on end-of-document tokens")
    add(g, "--reset-position-ids", action="store_true", help="restart position ids after each end-of-document")
    add(g, "--reset-attention-mask", action="store_true", help="no attention across end-of-document tokens")
    add(g, "--no-create-attention-mask-in-dataloader", dest="create_attention_mask_in_dataloader",
        action="store_false", help="the dataloader here makes an attention mask only for --reset-attention-mask and "
        "packed SFT (otherwise the model's own causal mask applies), so this changes nothing else; with those it "
        "is refused (the mask is how document boundaries reach attention)")
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
    add(g, "--log-batch-size-to-tensorboard", action="store_true", help="write the global batch size too")
    add(g, "--tensorboard-queue-size", type=int, default=1000, help="TensorBoard events buffered before a flush")
    add(g, "--wandb-project", default=None, help="log to Weights & Biases (WANDB_MODE=offline works offline)")
    add(g, "--wandb-exp-name", default=None, help="wandb run name")
    add(g, "--wandb-save-dir", default=None, help="wandb directory")

    g = parser.add_argument_group("GPU-only Megatron-LM flags (refused on CPU)")
    add(g, "--fp8-format", default=None, choices=FP8_FORMATS, help="FP8 training (Transformer Engine)")
    add(g, "--fp8-recipe", default=None, choices=FP8_RECIPES, help="FP8 scaling recipe")
    add(g, "--fp8-amax-history-len", type=int, default=None, help="FP8 delayed scaling: amax history length")
    add(g, "--fp8-amax-compute-algo", default=None, choices=FP8_AMAX_ALGOS,
        help="FP8 delayed scaling: amax from the most recent step or the history's max")
    add(g, "--tp-comm-overlap", action="store_true", help="overlap TP communication with GEMMs (Transformer Engine)")
    add(g, "--attention-backend", default=None, choices=ATTENTION_BACKENDS, help="Transformer Engine attention kernel")
    add(g, "--enable-cuda-graph", action="store_true", help="CUDA graphs (megatron-core's local implementation)")
    add(g, "--cuda-graph-impl", default=None, choices=CUDA_GRAPH_IMPLS, help="CUDA graph implementation")
    add(g, "--external-cuda-graph", action="store_true",
        help="Megatron-LM's alias of --cuda-graph-impl transformer_engine")
    add(g, "--cuda-graph-scope", nargs="+", default=None, choices=CUDA_GRAPH_SCOPES,
        help="what a CUDA graph captures (default: whole layers)")
    add(g, "--te-rng-tracker", action="store_true", help="Transformer Engine's RNG tracker (CUDA graphs need it)")
    add(g, "--cpu-offloading", action="store_true",
        help="offload activations to host memory (Transformer Engine's cpu_offload context)")
    add(g, "--cpu-offloading-num-layers", type=int, default=None, help="layers whose activations are offloaded")
    add(g, "--optimizer-cpu-offload", action="store_true",
        help="keep (a fraction of) the optimizer state and step on the host (megatron-core's HybridDeviceOptimizer; "
        "needs --use-precision-aware-optimizer and --use-distributed-optimizer, as in Megatron-LM)")
    add(g, "--optimizer-offload-fraction", type=float, default=None,
        help="with --optimizer-cpu-offload: the fraction offloaded (default 1.0)")
    add(g, "--use-precision-aware-optimizer", action="store_true",
        help="megatron-core's precision-aware optimizer path (Transformer Engine's FusedAdam, or the CPU offload)")
    add(g, "--cross-entropy-loss-fusion", action="store_true", help="fused cross entropy")
    add(g, "--cross-entropy-fusion-impl", default=None, choices=("native", "te"), help="fused cross entropy kernel")

    g = parser.add_argument_group("Megatron-LM flags refused here (the error says why)")
    for flag in UNSUPPORTED:
        add(g, flag, nargs="*", action=_Refuse, help=argparse.SUPPRESS)
    parser.set_defaults(unsupported_flags=[])


def gpu_flags(a: argparse.Namespace) -> list[str]:
    """The GPU-only flags given."""
    given = [("--fp8-format", a.fp8_format), ("--fp8-recipe", a.fp8_recipe),
             ("--fp8-amax-history-len", a.fp8_amax_history_len is not None),
             ("--fp8-amax-compute-algo", a.fp8_amax_compute_algo), ("--tp-comm-overlap", a.tp_comm_overlap),
             ("--attention-backend", a.attention_backend), ("--enable-cuda-graph", a.enable_cuda_graph),
             ("--cuda-graph-impl", a.cuda_graph_impl not in (None, "none")),
             ("--external-cuda-graph", a.external_cuda_graph), ("--cuda-graph-scope", a.cuda_graph_scope),
             ("--te-rng-tracker", a.te_rng_tracker), ("--cross-entropy-loss-fusion", a.cross_entropy_loss_fusion),
             ("--cross-entropy-fusion-impl", a.cross_entropy_fusion_impl), ("--cpu-offloading", a.cpu_offloading),
             ("--cpu-offloading-num-layers", a.cpu_offloading_num_layers is not None),
             ("--optimizer-cpu-offload", a.optimizer_cpu_offload),
             ("--optimizer-offload-fraction", a.optimizer_offload_fraction is not None),
             ("--use-precision-aware-optimizer", a.use_precision_aware_optimizer)]
    return [flag for flag, value in given if value]


def _cuda_graphs(a: argparse.Namespace) -> Optional[str]:
    """The CUDA graph implementation the flags ask for (None: no CUDA graphs)."""
    if a.external_cuda_graph:
        return "transformer_engine"
    if a.cuda_graph_impl not in (None, "none"):
        return a.cuda_graph_impl
    return "local" if a.enable_cuda_graph else None


def validate(a: argparse.Namespace, on_gpu: bool) -> Optional[str]:
    """The problem with these flags, or None (``arguments.validate`` raises it as ``ArgumentError``)."""
    refused = a.unsupported_flags
    if refused:
        return f"{refused[0]} (a Megatron-LM flag) is not supported by this trainer: {UNSUPPORTED[refused[0]]}"
    gpu = gpu_flags(a)
    if gpu and not on_gpu:
        return (f"{', '.join(gpu)} {'needs' if len(gpu) == 1 else 'need'} a CUDA GPU (Transformer Engine / fused "
                "kernels / device memory to offload from); this run is on CPU")
    problem = _gpu_feature_problem(a) if gpu else None
    if problem:
        return problem
    if a.tp_comm_overlap and not a.sequence_parallel:
        return "--tp-comm-overlap needs --sequence-parallel"
    if a.overlap_param_gather and not (a.use_distributed_optimizer and a.overlap_grad_reduce):
        return "--overlap-param-gather needs --use-distributed-optimizer and --overlap-grad-reduce"
    if a.num_layers_per_virtual_pipeline_stage is not None and not a.overlap_p2p_comm \
            and a.pipeline_model_parallel_size == 2:
        return ("--no-overlap-p2p-communication with virtual pipeline stages needs --pipeline-model-parallel-size > 2 "
                "(at PP=2 a batched exchange holds two sends to the same rank, which pairs activations with "
                "gradients); drop the flag")
    if a.recompute_activations and a.recompute_granularity not in (None, "selective"):
        return ("--recompute-activations is --recompute-granularity selective; it contradicts "
                "--recompute-granularity full")
    if a.no_rope_fusion and a.rope_impl not in ("auto", "torch"):
        return f"--no-rope-fusion means --rope-impl torch; it contradicts --rope-impl {a.rope_impl}"
    if not a.create_attention_mask_in_dataloader and (a.reset_attention_mask or a.sft_pack_sequences):
        return ("--no-create-attention-mask-in-dataloader contradicts "
                f"{'--reset-attention-mask' if a.reset_attention_mask else '--sft-pack-sequences'}: the dataloader's "
                "attention mask is how document boundaries reach attention in this trainer")
    if a.padded_vocab_size is not None and a.padded_vocab_size < 1:
        return "--padded-vocab-size must be >= 1"
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


def _gpu_feature_problem(a: argparse.Namespace) -> Optional[str]:
    """What is wrong with the GPU-only flags on a GPU: combinations megatron-core refuses, and features it
    serves only with Transformer Engine (checked here, not as an assertion deep inside a build)."""
    from megatron_patch.models.builder import te_available

    fp8_details = a.fp8_recipe or a.fp8_amax_history_len is not None or a.fp8_amax_compute_algo
    if fp8_details and not a.fp8_format:
        return "--fp8-recipe / --fp8-amax-history-len / --fp8-amax-compute-algo need --fp8-format"
    if a.fp8_amax_history_len is not None and a.fp8_amax_history_len < 1:
        return "--fp8-amax-history-len must be >= 1"
    if a.external_cuda_graph and (a.enable_cuda_graph or a.cuda_graph_impl not in (None, "none")):
        return "--external-cuda-graph is --cuda-graph-impl transformer_engine; give one of them"
    if a.cuda_graph_scope and _cuda_graphs(a) is None:
        return "--cuda-graph-scope needs CUDA graphs (--cuda-graph-impl local|transformer_engine)"
    offload_layers = a.cpu_offloading_num_layers
    if offload_layers is not None and offload_layers < 0:
        return "--cpu-offloading-num-layers must be >= 0"
    if (a.cpu_offloading or offload_layers) and not te_available():
        return ("--cpu-offloading needs Transformer Engine: megatron-core offloads activations through its "
                "cpu_offload context, and it is not installed here")
    if a.te_rng_tracker and not te_available():
        return "--te-rng-tracker needs Transformer Engine, which is not installed here"
    return _optimizer_feature_problem(a)


def _optimizer_feature_problem(a: argparse.Namespace) -> Optional[str]:
    """Optimizer CPU offload and the precision-aware optimizer: Megatron-LM's rules, then whether the installed
    megatron-core builds such an optimizer here (0.19 does without Transformer Engine when offloading; 0.16's
    version check needs TE; the precision-aware path alone needs TE's FusedAdam)."""
    if a.optimizer_offload_fraction is not None and not a.optimizer_cpu_offload:
        return "--optimizer-offload-fraction needs --optimizer-cpu-offload"
    if a.optimizer_offload_fraction is not None and not 0.0 <= a.optimizer_offload_fraction <= 1.0:
        return "--optimizer-offload-fraction must lie in [0, 1]"
    if not (a.optimizer_cpu_offload or a.use_precision_aware_optimizer):
        return None
    if a.optimizer_cpu_offload and not a.use_precision_aware_optimizer:
        return ("--optimizer-cpu-offload needs --use-precision-aware-optimizer (megatron-core's offloading "
                "optimizer shares its code path, as in Megatron-LM)")
    if not a.use_distributed_optimizer or a.optimizer != "adam":
        return "--use-precision-aware-optimizer needs --use-distributed-optimizer and --optimizer adam"
    from megatron.core import __version__ as mcore_version
    from megatron.core.optimizer import OptimizerConfig

    try:
        OptimizerConfig(optimizer="adam", use_distributed_optimizer=True, bf16=a.bf16, fp16=a.fp16,
                        **optimizer_overrides(a))
    except Exception as e:  # noqa: BLE001 - whatever megatron-core raises is the reason to give
        flags = "--optimizer-cpu-offload" if a.optimizer_cpu_offload else "--use-precision-aware-optimizer"
        return (f"{flags}: megatron-core {mcore_version} cannot build this optimizer here "
                f"({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}); Transformer "
                "Engine provides what it is missing")
    return None


def normalize(a: argparse.Namespace) -> None:
    """Megatron-LM's shorthands as the flags they stand for."""
    if a.recompute_activations:
        a.recompute_granularity = "selective"
    if a.no_rope_fusion:
        a.rope_impl = "torch"


def architecture_disagreements(a: argparse.Namespace, margs) -> list[str]:
    """'--flag GIVEN (model: VALUE)' for every given architecture flag that disagrees with the model."""
    from megatron_patch.checkpointing.megatron_lm import query_groups

    fixed = fixed_flags()
    wrong, fixed_wrong = [], False
    for dest, model_value in architecture_flags().items():
        given = getattr(a, dest)
        if given is None:
            continue
        value = model_value(margs)
        same = abs(given - value) <= 1e-9 * abs(value) if isinstance(given, float) and value is not None else \
            given == value
        if not same:
            wrong.append(f"--{dest.replace('_', '-')} {given} (model: {value})")
            fixed_wrong = fixed_wrong or dest in fixed
    if a.group_query_attention or a.num_query_groups is not None:
        groups = query_groups(a.group_query_attention, a.num_query_groups,
                              a.num_attention_heads or margs.num_attention_heads)
        if groups != margs.num_query_groups:
            wrong.append(f"--group-query-attention/--num-query-groups mean {groups} query groups "
                         f"(model: {margs.num_query_groups})")
    if fixed_wrong:
        wrong.append("every supported family is a SwiGLU, RMSNorm model without biases that rotates the whole "
                     "head dimension with RoPE")
    return wrong


# ----------------------------------------------------------------------------- translations


def transformer_overrides(a: argparse.Namespace) -> dict[str, Any]:
    """``TransformerConfig`` keyword arguments from the flags (only those that were given or always apply)."""
    out: dict[str, Any] = {"hidden_dropout": a.hidden_dropout, "attention_dropout": a.attention_dropout}
    if a.num_layers_per_virtual_pipeline_stage is not None:
        # The interleaved schedule's exchanges overlapped (Megatron-LM's default there), not only for speed:
        # megatron-core's batched exchange posts send-prev, recv-prev, send-next, recv-next as one batch, and in the
        # steady state a rank sends an activation forward and a gradient backward at once. At PP=2 both go to the
        # same rank, where point-to-point messages match in the order posted, so each lands in the other's buffer
        # (same shapes, no error: wrong losses from the first step with more micro-batches than stages). The
        # overlapped exchange puts the two directions on separate process groups when PP=2.
        out["overlap_p2p_comm"] = a.overlap_p2p_comm
        out["batch_p2p_comm"] = not a.overlap_p2p_comm
    if a.init_method_std is not None:
        out["init_method_std"] = a.init_method_std
    if a.no_bias_swiglu_fusion:
        out["bias_activation_fusion"] = False
    if a.apply_query_key_layer_scaling:
        out["apply_query_key_layer_scaling"] = True
    if a.fp8_format:
        out["fp8"] = a.fp8_format
        out["fp8_recipe"] = a.fp8_recipe or "delayed"
        if a.fp8_amax_history_len is not None:
            out["fp8_amax_history_len"] = a.fp8_amax_history_len
        if a.fp8_amax_compute_algo:
            out["fp8_amax_compute_algo"] = a.fp8_amax_compute_algo
    if a.tp_comm_overlap:
        out["tp_comm_overlap"] = True
    if a.attention_backend:
        from megatron.core.transformer.enums import AttnBackend

        out["attention_backend"] = AttnBackend[a.attention_backend]
    if _cuda_graphs(a):
        out["cuda_graph_impl"] = _cuda_graphs(a)
        if a.cuda_graph_scope:
            out["cuda_graph_scope"] = list(a.cuda_graph_scope)  # names: megatron-core turns them into its enum
    if a.te_rng_tracker:
        out["use_te_rng_tracker"] = True
    if a.cross_entropy_loss_fusion:
        out["cross_entropy_loss_fusion"] = True
        out["cross_entropy_fusion_impl"] = a.cross_entropy_fusion_impl or "native"
    if a.cpu_offloading or a.cpu_offloading_num_layers:
        # Megatron-LM: a layer count > 0 turns offloading on.
        out["cpu_offloading"] = True
        out["cpu_offloading_num_layers"] = a.cpu_offloading_num_layers or 0
    return out


def ddp_overrides(a: argparse.Namespace) -> dict[str, Any]:
    """``DistributedDataParallelConfig`` keyword arguments from the flags."""
    return {"overlap_grad_reduce": a.overlap_grad_reduce, "overlap_param_gather": a.overlap_param_gather,
            "align_param_gather": a.overlap_param_gather}


def optimizer_overrides(a: argparse.Namespace) -> dict[str, Any]:
    """``OptimizerConfig`` keyword arguments from the flags."""
    out: dict[str, Any] = {"overlap_param_gather": a.overlap_param_gather}
    if a.use_precision_aware_optimizer:
        out["use_precision_aware_optimizer"] = True
    if a.optimizer_cpu_offload:
        out["optimizer_cpu_offload"] = True
        out["optimizer_offload_fraction"] = 1.0 if a.optimizer_offload_fraction is None else \
            a.optimizer_offload_fraction
    return out
