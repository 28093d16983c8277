"""``ModelArgs`` and the one table that relates its fields to HF ``config.json`` keys and to megatron-core's
``TransformerConfig``.

``ModelArgs`` field names ARE Megatron-LM's argument names (``num_layers``, ``num_query_groups``,
``untie_embeddings_and_output_weights``, ...), so one object fills a ``TransformerConfig``, the ``args``
namespace of a Megatron checkpoint and the trainer's arguments. ``FIELDS`` says, once per field, which HF
key holds it, which ``TransformerConfig`` field takes it, its type and its default. Everything that
translates a config in any direction walks that table: ``args_from_hf`` (HF -> ModelArgs),
``hf_config_dict`` (ModelArgs -> HF), ``megatron_args`` (ModelArgs <-> checkpoint args) and
``builder.transformer_config`` (ModelArgs -> TransformerConfig).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from megatron_patch.models.rope import RopeSpec


class ModelConfigError(ValueError):
    """A HF config this project cannot build a model from (the message names the field)."""


REQUIRED = object()


@dataclass(frozen=True)
class Field:
    """One model hyperparameter in all its spellings."""

    name: str  # ModelArgs attribute == Megatron-LM argument name
    hf: tuple[str, ...] = ()  # HF config.json keys, the first present wins; written back under hf[0]
    tc: Optional[str] = None  # TransformerConfig field
    default: Any = REQUIRED  # REQUIRED: the HF config must have it; None: derived from other fields
    kind: type = int  # int | float | bool
    invert: bool = False  # HF stores the negation (``tie_word_embeddings`` vs ``untie_...``)
    moe: bool = False  # only mixture-of-experts configs have it
    # Megatron-LM: the field in its saved ``args`` where it differs from ``name`` ("" = it saves none), and
    # whether its ``--use-checkpoint-args`` restores it (if not, a user must pass the flag ``--<name>``).
    mlm: Optional[str] = None
    mlm_restored: bool = True
    # Numbers must be finite and > 0 (every size, epsilon); False: >= 0 (a loss coefficient may be 0).
    positive: bool = True

    @property
    def mlm_arg(self) -> str:
        return self.name if self.mlm is None else self.mlm

    @property
    def flag(self) -> str:
        """Megatron-LM's command-line flag (``--norm-epsilon``)."""
        return "--" + self.name.replace("_", "-")


FIELDS: tuple[Field, ...] = (
    Field("num_layers", ("num_hidden_layers",), "num_layers"),
    Field("hidden_size", ("hidden_size",), "hidden_size"),
    Field("ffn_hidden_size", ("intermediate_size",), "ffn_hidden_size"),
    Field("num_attention_heads", ("num_attention_heads",), "num_attention_heads"),
    Field("num_query_groups", ("num_key_value_heads",), "num_query_groups", default=None),
    Field("kv_channels", ("head_dim",), "kv_channels", default=None),
    # Megatron-LM's ``args.vocab_size`` is a tokenizer argument, not the model's: only ``padded_vocab_size``.
    Field("vocab_size", ("vocab_size",), mlm=""),
    Field("max_position_embeddings", ("max_position_embeddings",), default=4096),
    Field("norm_epsilon", ("rms_norm_eps",), "layernorm_epsilon", default=1e-6, kind=float, mlm="layernorm_epsilon",
          mlm_restored=False),
    Field("untie_embeddings_and_output_weights", ("tie_word_embeddings",), default=False, kind=bool, invert=True),
    Field("add_qkv_bias", ("attention_bias",), "add_qkv_bias", default=False, kind=bool),
    Field("qk_layernorm", (), "qk_layernorm", default=False, kind=bool, mlm_restored=False),
    # Mixture of experts (None / 0 for dense models).
    Field("num_experts", ("num_experts", "num_local_experts"), "num_moe_experts", default=None, moe=True),
    Field("moe_ffn_hidden_size", ("moe_intermediate_size",), "moe_ffn_hidden_size", default=None, moe=True),
    Field("moe_router_topk", ("num_experts_per_tok",), "moe_router_topk", default=None, moe=True),
    Field("moe_aux_loss_coeff", ("router_aux_loss_coef",), "moe_aux_loss_coeff", default=0.0, kind=float,
          moe=True, mlm_restored=False, positive=False),
    Field("moe_shared_expert_intermediate_size", ("shared_expert_intermediate_size",),
          "moe_shared_expert_intermediate_size", default=None, moe=True),
)


@dataclass(frozen=True)
class ModelArgs:
    """The architecture of one model, under Megatron-LM's argument names (see ``FIELDS``)."""

    architecture: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    vocab_size: int
    max_position_embeddings: int
    norm_epsilon: float
    untie_embeddings_and_output_weights: bool
    add_qkv_bias: bool
    qk_layernorm: bool
    rope: RopeSpec = field(default_factory=RopeSpec)
    num_experts: Optional[int] = None
    moe_ffn_hidden_size: Optional[int] = None
    moe_router_topk: Optional[int] = None
    moe_aux_loss_coeff: float = 0.0
    moe_shared_expert_intermediate_size: Optional[int] = None
    # Routing and layer pattern (family-derived, no single HF key): see models/families/qwen_moe.py, mixtral.py.
    moe_router_pre_softmax: bool = False
    moe_shared_expert_gate: bool = False
    moe_layer_freq: Optional[tuple[int, ...]] = None  # 1 = MoE layer, 0 = dense; None = every layer MoE

    def __post_init__(self) -> None:
        """Every ``ModelArgs``, wherever it comes from (a HF config, a checkpoint's ``model_args``, a test), is
        one a model can be built from: numbers finite and positive, types right, fields consistent."""
        if not isinstance(self.architecture, str):
            raise ModelConfigError(f"model argument 'architecture' must be a string, got {self.architecture!r}")
        if not isinstance(self.rope, RopeSpec):
            raise ModelConfigError(f"model argument 'rope' must be a RopeSpec, got {type(self.rope).__name__}")
        for f in FIELDS:
            value = getattr(self, f.name)
            if value is None and f.default is None:
                continue
            object.__setattr__(self, f.name, check_value(value, f, f"model argument {f.name!r}"))
        for name in ("moe_router_pre_softmax", "moe_shared_expert_gate"):
            if not isinstance(getattr(self, name), bool):
                raise ModelConfigError(f"model argument {name!r} must be true or false, got {getattr(self, name)!r}")
        for name in ("num_query_groups", "kv_channels"):
            if getattr(self, name) is None:
                raise ModelConfigError(f"model argument {name!r} is missing")
        if self.num_attention_heads % self.num_query_groups:
            raise ModelConfigError(f"num_attention_heads {self.num_attention_heads} is not divisible by "
                                   f"num_key_value_heads {self.num_query_groups}")
        if self.is_moe:
            self._check_moe()

    def _check_moe(self) -> None:
        for name in ("moe_ffn_hidden_size", "moe_router_topk"):
            if getattr(self, name) is None:
                raise ModelConfigError(f"a mixture-of-experts model needs {name} ({_hf_name(name)})")
        if self.moe_router_topk > self.num_experts:
            raise ModelConfigError(f"num_experts_per_tok {self.moe_router_topk} is larger than num_experts "
                                   f"{self.num_experts}: a token cannot be routed to more experts than there are")
        freq = self.moe_layer_freq
        if freq is not None:
            if not isinstance(freq, (tuple, list)) or len(freq) != self.num_layers or \
                    not all(type(x) is int and x in (0, 1) for x in freq) or not any(freq):
                raise ModelConfigError(f"the MoE layer pattern must be {self.num_layers} values 0/1 with at least one "
                                       f"1 (one per layer), got {short_repr(freq)}")
            object.__setattr__(self, "moe_layer_freq", tuple(freq))

    @property
    def is_moe(self) -> bool:
        return bool(self.num_experts)

    @property
    def num_moe_layers(self) -> int:
        if not self.is_moe:
            return 0
        return self.num_layers if self.moe_layer_freq is None else sum(self.moe_layer_freq)

    def is_moe_layer(self, layer: int) -> bool:
        return self.is_moe and (self.moe_layer_freq is None or bool(self.moe_layer_freq[layer]))

    @property
    def moe_layer_pattern(self) -> list[int]:
        """1 per MoE layer, 0 per dense layer."""
        return [int(self.is_moe_layer(i)) for i in range(self.num_layers)]

    def padded_vocab_size(self, divisible_by: int, tp: int) -> int:
        """Megatron pads the vocab to a multiple of ``divisible_by * tp`` so each TP shard is even."""
        for name, value in (("--make-vocab-size-divisible-by", divisible_by), ("tensor-parallel size", tp)):
            if type(value) is not int or value < 1:
                raise ModelConfigError(f"{name} must be an integer >= 1, got {value!r}")
        multiple = divisible_by * tp
        return -(-self.vocab_size // multiple) * multiple

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if d["moe_layer_freq"] is not None:
            d["moe_layer_freq"] = list(d["moe_layer_freq"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArgs":
        if not isinstance(d, dict) or not isinstance(d.get("rope"), dict):
            raise ModelConfigError("model arguments must be a dict holding a 'rope' dict")
        d = dict(d)
        try:
            d["rope"] = RopeSpec(**d["rope"])
        except TypeError as e:
            raise ModelConfigError(f"rope arguments: {e}") from None
        if d.get("moe_layer_freq") is not None:
            d["moe_layer_freq"] = tuple(d["moe_layer_freq"])
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in set(d) - known)
        if unknown:
            raise ModelConfigError(f"unknown model argument(s) {', '.join(unknown)}")
        missing = sorted(f.name for f in dataclasses.fields(cls) if f.name not in d and
                         f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
        if missing:
            raise ModelConfigError(f"missing model argument(s) {', '.join(missing)}")
        return cls(**d)


# What every supported family is, under Megatron-LM's argument names (its flags and its saved ``args``): the
# builder's TransformerConfig, the args written for Megatron-LM, the trainer's architecture-flag check and the
# check of Megatron-LM's own checkpoints all read this one table.
FIXED_ARCHITECTURE = {
    "swiglu": True, "normalization": "RMSNorm", "position_embedding_type": "rope", "add_bias_linear": False,
    "apply_layernorm_1p": False, "squared_relu": False, "rotary_interleaved": False, "rotary_percent": 1.0,
    "multi_latent_attention": False,
}


def moe_routing(args: ModelArgs) -> dict:
    """How megatron must route tokens to route as the HF model does, under the names ``TransformerConfig`` and
    Megatron-LM's flags and args share (the builder, the args written for Megatron-LM and its model provider's
    defaults all take them from here)."""
    return dict(
        moe_router_score_function="softmax",
        moe_router_pre_softmax=args.moe_router_pre_softmax,
        moe_shared_expert_gate=args.moe_shared_expert_gate,
        moe_layer_freq=list(args.moe_layer_freq) if args.moe_layer_freq is not None else 1,
        moe_router_load_balancing_type="aux_loss",
        moe_router_dtype="fp32",  # HF computes the routing softmax in fp32
    )


def layer_pattern(freq, num_layers: int) -> Optional[list[int]]:
    """Megatron-LM's ``moe_layer_freq`` (N: every N-th layer, or a 0/1 list) as one 0/1 entry per layer; a value
    that is neither comes back as it is, so a comparison names it rather than failing on it."""
    if freq is None:
        return None
    if type(freq) is int and freq >= 1:
        return [int(i % freq == 0) for i in range(num_layers)]
    if isinstance(freq, (list, tuple)) and all(type(x) is int for x in freq):
        return list(freq)
    return freq


def short_repr(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters (for error lines)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _hf_name(name: str) -> str:
    return next((f.hf[0] for f in FIELDS if f.name == name and f.hf), name)


def check_value(value: Any, f: Field, where: str) -> Any:
    """A value of field ``f`` with its JSON type checked (a string for a number is refused, not coerced) and a
    number finite and in range (> 0, or >= 0 where ``f.positive`` is False); returns it as ``f.kind``."""
    if f.kind is bool:
        if not isinstance(value, bool):
            raise ModelConfigError(f"{where} must be true or false, got {short_repr(value)}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ModelConfigError(f"{where} must be a number, got {type(value).__name__} {short_repr(value)}")
    if not math.isfinite(value):
        raise ModelConfigError(f"{where} must be a finite number, got {value!r}")
    if f.kind is int:
        if value != int(value):
            raise ModelConfigError(f"{where} must be an integer, got {value!r}")
        value = int(value)
        if value < 1:
            raise ModelConfigError(f"{where} must be >= 1, got {value}")
        return value
    value = float(value)
    if value < 0 or (f.positive and value == 0):
        raise ModelConfigError(f"{where} must be {'>' if f.positive else '>='} 0, got {value}")
    return value


def read_fields(hf_config: dict) -> dict:
    """The ``FIELDS`` values of a HF config dict: typed, defaulted, required ones checked."""
    values = {}
    for f in FIELDS:
        key = next((k for k in f.hf if hf_config.get(k) is not None), None)
        if key is None:
            if f.default is REQUIRED:
                raise ModelConfigError(f"config is missing the required field {f.hf[0]!r}")
            values[f.name] = f.default
            continue
        value = check_value(hf_config[key], f, f"config field {key!r}")
        values[f.name] = (not value) if f.invert else value
    return values


def hf_fields(args: ModelArgs) -> dict:
    """``FIELDS`` back to HF keys (the inverse of ``read_fields``; unset MoE fields are left out)."""
    out = {}
    for f in FIELDS:
        value = getattr(args, f.name)
        if f.hf and value is not None and (args.is_moe or not f.moe):
            out[f.hf[0]] = (not value) if f.invert else value
    return out


def transformer_config_fields(args: ModelArgs) -> dict:
    """``TransformerConfig`` keyword arguments of the table fields that have one."""
    return {f.tc: getattr(args, f.name) for f in FIELDS if f.tc and (args.is_moe or not f.moe)}


def differences(a: ModelArgs, b: ModelArgs, a_name: str, b_name: str) -> list[str]:
    """Every field where ``a`` and ``b`` differ, as 'name A (a_name) vs B (b_name)' (rope fields one by one)."""
    out = []

    def pairs(x: ModelArgs):
        for f in dataclasses.fields(x):
            value = getattr(x, f.name)
            if isinstance(value, RopeSpec):
                for g in dataclasses.fields(value):
                    yield f"rope {g.name}", getattr(value, g.name)
            else:
                yield f.name, value

    for (name, x), (_, y) in zip(pairs(a), pairs(b)):
        if x != y:
            out.append(f"{name} {short_repr(x)} ({a_name}) vs {short_repr(y)} ({b_name})")
    return out


def check_against_checkpoint(args: ModelArgs, where: str, tensors: int, layers: Optional[int] = None,
                             experts: bool = True) -> None:
    """Sizes that the tensors a checkpoint actually holds can back, checked before anything is planned or
    allocated per layer or expert (a config saying 10^9 layers would otherwise take minutes and gigabytes
    before any shape check). ``tensors``: how many tensors ``where`` holds (every layer, and every expert of
    every MoE layer, has at least one); ``layers``: the layer count, where the checkpoint's own structure says it.
    ``experts=False``: the checkpoint holds no per-expert tensors by design (LoRA adapters of attention only),
    so only the layer count is bounded."""
    if layers is not None and args.num_layers != layers:
        raise ModelConfigError(f"the model arguments say num_layers {args.num_layers}, but {where} holds "
                               f"{layers} layers")
    if args.num_layers > tensors:
        raise ModelConfigError(f"the model arguments say num_layers {args.num_layers}, but {where} holds only "
                               f"{tensors} tensors (at least one per layer)")
    if experts and args.is_moe and args.num_moe_layers * args.num_experts > tensors:
        raise ModelConfigError(f"the model arguments say {args.num_experts} experts in each of {args.num_moe_layers} "
                               f"MoE layers, but {where} holds only {tensors} tensors (at least one per expert)")
