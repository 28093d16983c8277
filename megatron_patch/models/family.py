"""What a model family declares, and the translation of a HF ``config.json`` into model arguments.

A family is a few constants over one generic engine: which HF ``architectures`` it serves, whether
its attention has a QKV bias or q/k RMSNorm, and any config it must refuse. Everything else (the
config field table below, the layer spec, the weight table in ``checkpointing/weights.py``) is shared.

``ModelArgs`` uses Megatron-LM's argument names, so the same object fills a ``TransformerConfig``,
the ``args`` namespace of a Megatron checkpoint, and the training arguments.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

from megatron_patch.models.rope import RopeSpec, parse_rope


class ModelConfigError(ValueError):
    """A HF config this project cannot build a model from (the message names the problem)."""


@dataclass(frozen=True)
class ModelArgs:
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

    def padded_vocab_size(self, divisible_by: int, tp: int) -> int:
        """Megatron pads the vocab to a multiple of ``divisible_by * tp`` so each TP shard is even."""
        multiple = divisible_by * tp
        return -(-self.vocab_size // multiple) * multiple

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArgs":
        d = dict(d)
        d["rope"] = RopeSpec(**d["rope"])
        return cls(**d)


@dataclass(frozen=True)
class Family:
    name: str
    architectures: tuple[str, ...]
    add_qkv_bias: bool = False
    qk_layernorm: bool = False
    # Extra checks on the raw HF config (e.g. Qwen2's sliding window), raising ModelConfigError.
    validate: Optional[Callable[[dict], None]] = None


# (HF field, ModelArgs field, default when absent; REQUIRED = must be present)
REQUIRED = object()
CONFIG_FIELDS = (
    ("num_hidden_layers", "num_layers", REQUIRED),
    ("hidden_size", "hidden_size", REQUIRED),
    ("intermediate_size", "ffn_hidden_size", REQUIRED),
    ("num_attention_heads", "num_attention_heads", REQUIRED),
    ("vocab_size", "vocab_size", REQUIRED),
    ("rms_norm_eps", "norm_epsilon", 1e-6),
    ("max_position_embeddings", "max_position_embeddings", 4096),
)

_REGISTRY: dict[str, Family] = {}


def register(family: Family) -> Family:
    for arch in family.architectures:
        _REGISTRY[arch] = family
    return family


def supported_architectures() -> list[str]:
    _load_families()
    return sorted(_REGISTRY)


def get_family(architecture: str) -> Family:
    _load_families()
    if architecture not in _REGISTRY:
        raise ModelConfigError(
            f"unsupported architecture {architecture!r}; supported: {', '.join(supported_architectures())}"
        )
    return _REGISTRY[architecture]


def _load_families() -> None:
    # Importing the family modules registers them; done lazily to keep this module import-light.
    from megatron_patch.models import llama, qwen  # noqa: F401


def args_from_hf(hf_config: dict) -> ModelArgs:
    """Translate a HF config dict (transformers 4.x or 5.x shape) into ``ModelArgs``."""
    archs = hf_config.get("architectures") or []
    if not archs:
        raise ModelConfigError("config has no 'architectures' field")
    family = get_family(archs[0])
    if family.validate:
        family.validate(hf_config)
    values = {}
    for hf_key, name, default in CONFIG_FIELDS:
        if hf_config.get(hf_key) is None:
            if default is REQUIRED:
                raise ModelConfigError(f"config is missing the required field {hf_key!r}")
            values[name] = default
        else:
            values[name] = hf_config[hf_key]
    heads = values["num_attention_heads"]
    groups = hf_config.get("num_key_value_heads") or heads
    head_dim = hf_config.get("head_dim") or values["hidden_size"] // heads
    if heads % groups:
        raise ModelConfigError(f"num_attention_heads {heads} is not divisible by num_key_value_heads {groups}")
    if hf_config.get("hidden_act", "silu") != "silu":
        raise ModelConfigError(f"unsupported hidden_act {hf_config['hidden_act']!r}; only 'silu' (SwiGLU)")
    if float(hf_config.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ModelConfigError("partial_rotary_factor != 1.0 is not supported")
    # Qwen2 configs carry attention_bias implicitly (always on); Llama may set it explicitly.
    qkv_bias = family.add_qkv_bias or bool(hf_config.get("attention_bias", False))
    if hf_config.get("mlp_bias"):
        raise ModelConfigError("mlp_bias=True is not supported")
    return ModelArgs(
        architecture=archs[0],
        num_query_groups=int(groups),
        kv_channels=int(head_dim),
        untie_embeddings_and_output_weights=not hf_config.get("tie_word_embeddings", False),
        add_qkv_bias=qkv_bias,
        qk_layernorm=family.qk_layernorm,
        rope=parse_rope(hf_config),
        **values,
    )


def read_hf_config(model_dir: str) -> dict:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise ModelConfigError(f"no config.json in {model_dir}")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ModelConfigError(f"{path} is not valid JSON: {e}") from None
