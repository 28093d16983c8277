"""One run's configuration, typed and frozen: what ``python -m megatron_patch.pretrain`` was asked to do.

The command line (``arguments.py``, with Megatron-LM's flags in ``megatron_lm_flags.py``) is parsed, checked
and translated once into a ``RunConfig`` (``arguments.run_config``; ``pretrain.prepare`` adds the opened
``--load``). Everything below the command line - the trainer, data, checkpoints, logging - reads these
objects and never an ``argparse.Namespace``; Megatron-LM's own namespace exists only where Megatron-LM reads
it (the ``args`` written into checkpoints, ``checkpointing/megatron_args.py``).

The groups follow the concerns of a run: the model and how it is split (``ModelArgs``, ``ParallelLayout``,
``ModelBuild``), batch, optimizer, schedule, data, checkpoints, logging. Translations of Megatron-LM flags
into megatron-core's configs are done at the edge and kept here as keyword dictionaries
(``ModelBuild.transformer_overrides``, ``OptimizerSettings.config_overrides`` / ``ddp_overrides``).

Capabilities plug in as one more field each, read by one small module: LoRA adapters (``RunConfig.lora``,
``training/lora.py``: a model transform the trainer applies between building and wrapping the chunks), context
parallelism (``layout.cp`` and ``ModelBuild.cp_comm_type``, ``training/context_parallel.py``: the batch cut per
CP rank and the loss reduction over DP x CP), grouped-GEMM experts (``ModelBuild.moe_grouped_gemm``), the GPU
speed levers (``ModelBuild.liger_kernels`` / ``sdpa_backend``, ``arguments.fusion_settings``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import torch

from megatron_patch.checkpointing.hf import HFSource
from megatron_patch.checkpointing.megatron_format import CheckpointInfo
from megatron_patch.lora.config import LoraConfig
from megatron_patch.models.config import ModelArgs
from megatron_patch.parallel import ParallelLayout


@dataclass(frozen=True)
class ModelBuild:
    """How the model chunks are built (beyond the architecture, which is ``ModelArgs``)."""

    transformer_impl: str = "auto"
    rope_impl: str = "auto"
    attention_impl: str = "auto"
    make_vocab_size_divisible_by: int = 128
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    moe_token_dispatcher_type: str = "alltoall"
    moe_aux_loss_coeff: Optional[float] = None  # None: the model's router_aux_loss_coef
    moe_router_load_balancing_type: str = "aux_loss"
    moe_grouped_gemm: bool = False
    liger_kernels: frozenset = frozenset()  # fusions.liger.KERNELS in use (resolved by arguments.fusion_settings)
    sdpa_backend: str = "auto"  # models.attention.SDPA_BACKENDS: SDPA's kernel on the local spec
    cp_comm_type: Optional[str] = None  # Transformer Engine's CP attention (``training/context_parallel.py``)
    # Other ``TransformerConfig`` fields the flags set (recompute, init std, fusion switches, GPU-only features).
    transformer_overrides: dict = field(default_factory=dict)

    @property
    def experts_impl(self) -> str:
        """The MoE expert module this build makes: its optimizer state's layout, recorded in checkpoints as
        ``moe_experts_impl`` (``megatron_args.experts_resume_problem``)."""
        from megatron_patch.checkpointing.megatron_args import experts_impl
        from megatron_patch.models.builder import resolve_transformer_impl

        return experts_impl(resolve_transformer_impl(self.transformer_impl), self.moe_grouped_gemm)


@dataclass(frozen=True)
class BatchSettings:
    micro_batch_size: int = 1
    global_batch_size: int = 1
    seq_length: int = 1024
    num_microbatches: int = 1  # per data-parallel rank and step


@dataclass(frozen=True)
class OptimizerSettings:
    optimizer: str = "adam"  # adam | sgd (megatron-core's OptimizerConfig.optimizer)
    lr: float = 1e-4
    min_lr: float = 0.0
    weight_decay: float = 0.01
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    sgd_momentum: float = 0.9
    use_distributed_optimizer: bool = False
    # megatron-core's DistributedDataParallelConfig / OptimizerConfig fields the flags set (overlap, offload...).
    ddp_overrides: dict = field(default_factory=dict)
    config_overrides: dict = field(default_factory=dict)

    @property
    def overlap_grad_reduce(self) -> bool:
        return bool(self.ddp_overrides.get("overlap_grad_reduce"))

    @property
    def overlap_param_gather(self) -> bool:
        return bool(self.ddp_overrides.get("overlap_param_gather"))


@dataclass(frozen=True)
class ScheduleSettings:
    """How long the run is, the learning-rate schedule, and when it evaluates or stops early."""

    train_iters: int = 1
    lr_warmup_iters: int = 0
    lr_decay_iters: Optional[int] = None  # None: train_iters
    lr_decay_style: str = "cosine"
    lr_wsd_decay_iters: Optional[int] = None  # None: 10% of train_iters
    lr_wsd_decay_style: str = "exponential"
    # On resume, which schedule wins when it differs from the checkpoint's (Megatron-LM's rule: neither = refuse).
    override_opt_param_scheduler: bool = False
    use_checkpoint_opt_param_scheduler: bool = False
    exit_interval: Optional[int] = None
    eval_interval: Optional[int] = None
    eval_iters: int = 10


@dataclass(frozen=True)
class DataSettings:
    mock: bool = False
    data_path: tuple[str, ...] = ()  # prefixes, optionally weighted ('W1 P1 W2 P2'); SFT: JSONL files
    split: str = "969,30,1"
    train_data_path: tuple[str, ...] = ()  # Megatron-LM's per-split blends (instead of data_path + split)
    valid_data_path: tuple[str, ...] = ()
    tokenizer_model: Optional[str] = None
    data_cache_path: Optional[str] = None
    sft: bool = False
    sft_pack_sequences: bool = False
    dataloader_type: str = "single"  # single | cyclic
    num_workers: int = 0
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False


@dataclass(frozen=True)
class CheckpointSettings:
    load: Optional[str] = None
    save: Optional[str] = None
    save_interval: Optional[int] = None
    ckpt_format: str = "torch"
    save_hf: Optional[str] = None
    save_hf_interval: Optional[int] = None
    finetune: bool = False
    no_load_optim: bool = False
    no_load_rng: bool = False
    no_save_optim: bool = False
    hf_config_path: Optional[str] = None  # --hf-config: the HF config.json/tokenizer of a Megatron-LM checkpoint


@dataclass(frozen=True)
class LoraSettings:
    """``--lora-*``: adapters trained on a frozen base (``training/lora.py`` applies, saves and loads them)."""

    config: LoraConfig
    load: Optional[str] = None  # --lora-load: a LoRA run's adapter-only checkpoint, or a HF PEFT adapter directory
    resume: Optional[CheckpointInfo] = None  # --lora-load opened: a Megatron checkpoint
    peft: Optional[object] = None  # --lora-load opened: a HF PEFT adapter (``lora.hf_peft.PeftSource``)


@dataclass(frozen=True)
class LoggingSettings:
    log_interval: int = 10
    metrics_file: Optional[str] = None
    tensorboard_dir: Optional[str] = None
    tensorboard_queue_size: int = 1000
    log_timers_to_tensorboard: bool = False
    log_validation_ppl_to_tensorboard: bool = False
    log_batch_size_to_tensorboard: bool = False
    log_throughput: bool = False
    wandb_project: Optional[str] = None
    wandb_exp_name: Optional[str] = None
    wandb_save_dir: Optional[str] = None


@dataclass(frozen=True)
class RunConfig:
    """Everything one training run needs, checked; built once per run at the command-line edge."""

    model: ModelArgs
    layout: ParallelLayout  # with the world size: the one statement of the parallel rules has passed
    params_dtype: torch.dtype = torch.float32
    build: ModelBuild = field(default_factory=ModelBuild)
    batch: BatchSettings = field(default_factory=BatchSettings)
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    schedule: ScheduleSettings = field(default_factory=ScheduleSettings)
    data: DataSettings = field(default_factory=DataSettings)
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    seed: int = 1234
    check_for_nan_in_loss_and_grad: bool = True
    # ``--load``, opened (and checked) once at start-up: a Megatron checkpoint, or a HF directory.
    resume: Optional[CheckpointInfo] = None
    hf_source: Optional[HFSource] = None
    hf_config: Optional[dict] = None  # the HF config.json of the run (what --save-hf writes), when there is one
    lora: Optional[LoraSettings] = None  # --lora-rank: adapters on a frozen base

    @property
    def bf16(self) -> bool:
        return self.params_dtype == torch.bfloat16

    @property
    def fp16(self) -> bool:
        return self.params_dtype == torch.float16

    def scalars(self) -> dict:
        """Every plain setting, flattened (``group.name``): what experiment trackers record for the run."""
        scalar = (int, float, str, bool, type(None))
        out = {}
        for group in dataclasses.fields(self):
            value = getattr(self, group.name)
            if group.name in ("resume", "hf_source", "lora"):
                continue  # the opened --load: its path is in checkpoint.load
            if dataclasses.is_dataclass(value):
                out.update({f"{group.name}.{f.name}": getattr(value, f.name) for f in dataclasses.fields(value)
                            if isinstance(getattr(value, f.name), scalar)})
            elif isinstance(value, scalar):
                out[group.name] = value
        out["params_dtype"] = str(self.params_dtype).removeprefix("torch.")
        return out
