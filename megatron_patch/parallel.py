"""The parallel layout of a run or of a checkpoint, and the one statement of its rules.

``ParallelLayout`` holds the sizes Megatron-LM's flags give: tensor (TP), pipeline (PP) with virtual stages
(VPP) or uneven first/last stages, context (CP), expert (EP) and expert-tensor (ETP) parallelism, sequence
parallelism, and for a run the world size, from which the data-parallel sizes follow. ``check`` is the one
place its rules live: the sizes themselves, the world size, what the model can be cut into (attention heads,
query groups, MLP widths, experts), the pipeline split (``stage_sizes``) and the sequence length under CP / SP.
The trainer (before any process group), the converter (before reading), the model builder and the runtime
all call it, so a layout is refused with the same words wherever it comes from. Messages name Megatron-LM's
flags, which both command lines take.

``stage_sizes`` / ``stage_layers`` say which decoder layers a pipeline rank (and virtual chunk) holds: even
splits, interleaved virtual chunks, Megatron-LM's uneven first/last stages; the same as megatron-core's
``get_transformer_layer_offset`` / ``get_num_layers_to_build`` (``tests/test_transforms.py`` compares them
over a grid), in plain Python so the converter never imports megatron-core.

Pure Python on purpose: the bottom of the layers (runtime -> models -> checkpointing -> training), importable
by all of them. The model is read by attribute (``models.config.ModelArgs``), never imported.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional


class LayoutError(ValueError):
    """A parallel layout that cannot run, or that the model cannot be split into (the message says why)."""


@dataclass(frozen=True)
class PipelineLayout:
    """The pipeline split of a model. Field names match ``TransformerConfig``, which works here too."""

    num_layers: int
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    num_layers_in_first_pipeline_stage: Optional[int] = None
    num_layers_in_last_pipeline_stage: Optional[int] = None


def check_virtual_stages(pp: int, virtual: bool) -> None:
    """Interleaved (virtual) pipeline stages need more than one pipeline stage."""
    if virtual and pp == 1:
        raise LayoutError("virtual pipeline stages: --num-layers-per-virtual-pipeline-stage needs "
                          "--pipeline-model-parallel-size > 1")


def stage_sizes(layers: int, pp: int, vpp: Optional[int] = None, first: Optional[int] = None,
                last: Optional[int] = None) -> list[int]:
    """Layers per pipeline rank (per virtual chunk when ``vpp``); ``LayoutError`` naming the problem."""
    if pp < 1:
        raise LayoutError(f"pipeline parallel size must be >= 1, got {pp}")
    if pp > layers:
        raise LayoutError(f"pipeline parallel size {pp} is larger than num_layers {layers}")
    if vpp is not None and vpp < 1:
        raise LayoutError(f"virtual pipeline stages must be >= 1, got {vpp}")
    check_virtual_stages(pp, bool(vpp))
    if first is None and last is None:
        per = pp * (vpp or 1)
        if layers % per:
            raise LayoutError(f"num_layers {layers} is not divisible by pipeline parallel size {pp}"
                              + (f" x virtual stages {vpp}" if vpp else "")
                              + " (use --decoder-first/last-pipeline-num-layers for uneven splits)")
        return [layers // per] * pp
    if vpp:
        raise LayoutError("uneven pipeline splits cannot be combined with virtual pipeline stages here")
    edge = [n for n in (first, last) if n is not None]
    if any(n < 1 for n in edge):
        raise LayoutError("decoder first/last pipeline stage layer counts must be >= 1")
    middle_stages, middle_layers = pp - len(edge), layers - sum(edge)
    if middle_layers < 0 or (middle_stages == 0 and middle_layers != 0):
        raise LayoutError(f"uneven pipeline split {first}/{last} does not fit {layers} layers in {pp} stages")
    if middle_stages and (middle_layers < middle_stages or middle_layers % middle_stages):
        raise LayoutError(f"the {middle_layers} layers left after the first/last stages do not split evenly over "
                          f"{middle_stages} middle stages")
    sizes = [middle_layers // middle_stages if middle_stages else 0] * pp
    if first is not None:
        sizes[0] = first
    if last is not None:
        sizes[-1] = last
    return sizes


def stage_layers(pipeline, pp_rank: int, vp_stage: Optional[int] = None) -> range:
    """Global indices of the decoder layers held by pipeline rank ``pp_rank`` (virtual chunk ``vp_stage``).

    ``pipeline`` is a ``PipelineLayout`` or a megatron ``TransformerConfig``.
    """
    layers, pp = pipeline.num_layers, pipeline.pipeline_model_parallel_size
    vpp = pipeline.virtual_pipeline_model_parallel_size
    sizes = stage_sizes(layers, pp, vpp, pipeline.num_layers_in_first_pipeline_stage,
                        pipeline.num_layers_in_last_pipeline_stage)
    if vpp:
        # Virtual chunk v of every stage comes after chunk v-1 of all stages (interleaved schedule).
        offset = (vp_stage or 0) * (layers // vpp) + pp_rank * sizes[0]
        return range(offset, offset + sizes[0])
    offset = sum(sizes[:pp_rank])
    return range(offset, offset + sizes[pp_rank])


def sequence_divisor(cp: int, tp: int = 1, sequence_parallel: bool = False) -> int:
    """What the sequence length must be a multiple of: 2 x CP chunks (x TP with sequence parallelism)."""
    return (2 * cp if cp > 1 else 1) * (tp if sequence_parallel else 1)


# The sizes under megatron's names, which megatron-core's TransformerConfig and Megatron-LM's args share; the
# uneven stage sizes are the one pair they spell differently.
MEGATRON_NAMES = {"tp": "tensor_model_parallel_size", "pp": "pipeline_model_parallel_size",
                  "vpp": "virtual_pipeline_model_parallel_size", "cp": "context_parallel_size",
                  "ep": "expert_model_parallel_size", "etp": "expert_tensor_parallel_size",
                  "sequence_parallel": "sequence_parallel"}
STAGE_NAMES = {"config": ("num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage"),
               "args": ("decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers")}


@dataclass(frozen=True)
class ParallelLayout:
    """TP x PP (x VPP or uneven stages) x CP x EP (x ETP) [+ SP], and the world size of a run (None: not a run).

    ``etp`` None means the experts are cut like the dense layers (ETP = TP, ``expert_tp``).
    """

    tp: int = 1
    pp: int = 1
    vpp: Optional[int] = None  # virtual pipeline stages per pipeline rank (interleaved 1F1B)
    cp: int = 1
    ep: int = 1
    etp: Optional[int] = None
    first_stage_layers: Optional[int] = None  # Megatron-LM's --decoder-first/last-pipeline-num-layers
    last_stage_layers: Optional[int] = None
    sequence_parallel: bool = False
    world: Optional[int] = None

    # ------------------------------------------------------------------ derived sizes

    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp

    @property
    def model_parallel(self) -> int:
        """Ranks one model replica spans (TP x PP x CP)."""
        return self.tp * self.pp * self.cp

    @property
    def dp(self) -> int:
        """Data-parallel size (1 without a world size)."""
        return self.world // self.model_parallel if self.world else 1

    @property
    def expert_dp(self) -> int:
        """Data-parallel size of the experts: EP is carved out of data parallelism."""
        return self.world // (self.expert_tp * self.ep * self.pp) if self.world else 1

    @property
    def chunks(self) -> int:
        """Model chunks per rank (one per virtual stage)."""
        return self.vpp or 1

    @classmethod
    def of(cls, layout: Optional["ParallelLayout"] = None, **sizes: Any) -> "ParallelLayout":
        """``layout``, or one made of its fields given as keywords (``tp=2, pp=2``; what tests and tools write);
        never both."""
        if layout is not None and sizes:
            raise TypeError(f"give a ParallelLayout or its fields ({', '.join(sizes)}), not both")
        return layout if layout is not None else cls(**sizes)

    @staticmethod
    def split_fields(kwargs: dict) -> dict:
        """Take this class's fields out of ``kwargs`` (keyword arguments that mix them with others)."""
        return {k: kwargs.pop(k) for k in [k for k in kwargs if k in _FIELDS]}

    def replace(self, **changes: Any) -> "ParallelLayout":
        return dataclasses.replace(self, **changes)

    def megatron_fields(self, names: str = "config") -> dict[str, Any]:
        """The layout as keyword arguments under megatron's names: ``config`` for a ``TransformerConfig``,
        ``args`` for Megatron-LM's args (what a checkpoint carries)."""
        out = {MEGATRON_NAMES[k]: getattr(self, k) for k in MEGATRON_NAMES}
        out[MEGATRON_NAMES["etp"]] = self.expert_tp
        first, last = STAGE_NAMES[names]
        out.update({first: self.first_stage_layers, last: self.last_stage_layers})
        return out

    def pipeline(self, num_layers: int) -> PipelineLayout:
        return PipelineLayout(num_layers, self.pp, self.vpp, self.first_stage_layers, self.last_stage_layers)

    def stage_sizes(self, num_layers: int) -> list[int]:
        return stage_sizes(num_layers, self.pp, self.vpp, self.first_stage_layers, self.last_stage_layers)

    # ------------------------------------------------------------------ names

    def weights_key(self) -> tuple:
        """What a checkpoint's optimizer state depends on: a resume needs the same (CP, DP and SP do not count)."""
        return (self.tp, self.pp, self.vpp, self.ep, self.expert_tp, self.first_stage_layers, self.last_stage_layers)

    def describe(self) -> str:
        """``TP=2 PP=2 VPP=None`` (+ ``EP=.. ETP=..`` with experts, + the uneven first/last stages)."""
        text = f"TP={self.tp} PP={self.pp} VPP={self.vpp}"
        if (self.ep, self.expert_tp) != (1, self.tp):
            text += f" EP={self.ep} ETP={self.expert_tp}"
        if self.first_stage_layers is not None or self.last_stage_layers is not None:
            text += f" first/last stage layers {self.first_stage_layers}/{self.last_stage_layers}"
        return text

    # ------------------------------------------------------------------ the rules

    def check(self, model=None, seq_length: Optional[int] = None, training: bool = False) -> None:
        """Raise ``LayoutError`` naming the first rule this layout breaks.

        Without ``model`` only what needs no model (sizes, world size, sequence parallelism) is checked;
        ``seq_length``: the 2 x CP (x TP with sequence parallelism) rule; ``training``: what megatron-core
        needs to train rather than only run the model (MoE layers at TP > 1 need sequence parallelism).
        """
        self._check_sizes()
        if model is not None:
            self._check_model(model, training)
        if seq_length is not None:
            self._check_sequence(seq_length)

    def _check_sizes(self) -> None:
        if self.tp < 1:
            raise LayoutError(f"tensor parallel size must be >= 1, got {self.tp}")
        if self.cp < 1:
            raise LayoutError(f"context parallel size must be >= 1, got {self.cp}")
        if self.pp < 1:
            raise LayoutError(f"pipeline parallel size must be >= 1, got {self.pp}")
        if self.ep < 1 or self.expert_tp < 1:
            raise LayoutError(f"expert parallel ({self.ep}) and expert tensor parallel ({self.expert_tp}) sizes "
                              "must be >= 1")
        check_virtual_stages(self.pp, bool(self.vpp))
        if self.sequence_parallel and self.tp == 1:
            raise LayoutError("--sequence-parallel needs --tensor-model-parallel-size > 1")
        world = self.world
        if world is not None:
            if world % self.model_parallel:
                raise LayoutError(f"world size {world} is not divisible by TP ({self.tp}) x PP ({self.pp}) x CP "
                                  f"({self.cp})")
            if world % (self.expert_tp * self.ep * self.pp):
                raise LayoutError(f"world size {world} is not divisible by expert TP ({self.expert_tp}) x EP "
                                  f"({self.ep}) x PP ({self.pp})")

    def _check_model(self, model, training: bool) -> None:
        tp, heads, groups = self.tp, model.num_attention_heads, model.num_query_groups
        if heads % tp:
            raise LayoutError(f"num_attention_heads {heads} is not divisible by tensor parallel size {tp}")
        # megatron-core splits query groups across TP ranks; with TP > groups each group spans TP/groups ranks.
        if (groups >= tp and groups % tp) or (groups < tp and tp % groups):
            raise LayoutError(f"num_query_groups {groups} and tensor parallel size {tp} are incompatible: one "
                              "must divide the other")
        if model.ffn_hidden_size % tp:
            raise LayoutError(f"ffn_hidden_size {model.ffn_hidden_size} is not divisible by tensor parallel size {tp}")
        self.stage_sizes(model.num_layers)
        if not model.is_moe:
            if self.ep > 1:
                raise LayoutError(f"expert parallel size {self.ep} needs a mixture-of-experts model; this one is "
                                  "dense")
            return
        if model.num_experts % self.ep:
            raise LayoutError(f"num_experts {model.num_experts} is not divisible by expert parallel size {self.ep}")
        moe_ffn = model.moe_ffn_hidden_size or model.ffn_hidden_size
        if moe_ffn % self.expert_tp:
            raise LayoutError(f"moe_ffn_hidden_size {moe_ffn} is not divisible by expert tensor parallel size "
                              f"{self.expert_tp}")
        shared = model.moe_shared_expert_intermediate_size
        if shared and shared % tp:
            raise LayoutError(f"shared_expert_intermediate_size {shared} is not divisible by tensor parallel size {tp}")
        if training and tp > 1 and not self.sequence_parallel:
            raise LayoutError("training a MoE model with --tensor-model-parallel-size > 1 needs --sequence-parallel "
                              "(megatron-core's MoE layer requires it)")

    def _check_sequence(self, seq_length: int) -> None:
        div = sequence_divisor(self.cp, self.tp, self.sequence_parallel)
        if seq_length % div:
            parts = " x ".join(p for p in (f"2 x CP ({self.cp})" if self.cp > 1 else "",
                                           f"TP ({self.tp}) with sequence parallelism" if self.sequence_parallel
                                           else "") if p)
            fit = -(-seq_length // div) * div
            raise LayoutError(f"sequence length {seq_length} is not divisible by {parts} = {div}; use a multiple of "
                              f"{div} (e.g. --seq-length {fit}) or change the parallel sizes")


_FIELDS = frozenset(f.name for f in dataclasses.fields(ParallelLayout)) - {"world"}
