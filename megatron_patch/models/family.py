"""What a model family declares, the registry keyed by HF ``architectures``, and HF config translation.

A family is one module in ``megatron_patch/models/families/`` that calls ``register(Family(...))``: the HF
architecture names it serves, its HF ``model_type``, the ``ModelArgs`` values the architecture implies
(e.g. Qwen2's QKV bias), any config it must refuse, and its weight mappings (``models/mapping.py``).
Every module in that package is imported when the registry is first used, so adding a family is adding
one file; a package outside this project can register more through the ``megatron_patch.families``
entry-point group, and a test can call ``register`` itself.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from megatron_patch.models.config import ModelArgs, ModelConfigError, hf_fields, read_fields
from megatron_patch.models.rope import RopeConfigError, parse_rope

__all__ = ["Family", "ModelArgs", "ModelConfigError", "register", "get_family", "supported_architectures",
           "args_from_hf", "read_hf_config", "hf_config_dict", "family_of"]


@dataclass(frozen=True)
class Family:
    name: str
    architectures: tuple[str, ...]
    model_type: str  # HF ``model_type`` written into exported configs
    weights: Callable[[ModelArgs], list]  # the weight mappings of a model (models.mapping.Mapping)
    fixed: dict = field(default_factory=dict)  # ModelArgs values the architecture implies
    # ModelArgs values derived from the raw HF config beyond the shared field table (e.g. MoE layer pattern).
    translate: Optional[Callable[[dict], dict]] = None
    # Extra checks on the raw HF config (e.g. a sliding window), raising ModelConfigError.
    validate: Optional[Callable[[dict], None]] = None
    # HF config keys to write back that the shared field table does not produce.
    hf_extra: Optional[Callable[[ModelArgs], dict]] = None


_REGISTRY: dict[str, Family] = {}
_LOADED = False


def register(family: Family) -> Family:
    for arch in family.architectures:
        _REGISTRY[arch] = family
    return family


def _load_families() -> None:
    # Importing a family module registers it. Lazy, so importing this module stays cheap.
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    from megatron_patch.models import families

    for mod in pkgutil.iter_modules(families.__path__):
        importlib.import_module(f"{families.__name__}.{mod.name}")
    from importlib.metadata import entry_points

    for ep in entry_points(group="megatron_patch.families"):
        ep.load()


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


def family_of(args: ModelArgs) -> Family:
    return get_family(args.architecture)


def _architecture(hf_config: Any) -> str:
    if not isinstance(hf_config, dict):
        raise ModelConfigError(f"config must be a JSON object, got {type(hf_config).__name__}")
    archs = hf_config.get("architectures")
    if not archs:
        raise ModelConfigError("config has no 'architectures' field")
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise ModelConfigError(f"config field 'architectures' must be a list of names, got {archs!r}")
    return archs[0]


def args_from_hf(hf_config: dict) -> ModelArgs:
    """Translate a HF config dict (transformers 4.x or 5.x shape) into ``ModelArgs``."""
    arch = _architecture(hf_config)
    family = get_family(arch)
    if family.validate:
        family.validate(hf_config)
    values = read_fields(hf_config)
    heads, hidden = values["num_attention_heads"], values["hidden_size"]
    if values["num_query_groups"] is None:
        values["num_query_groups"] = heads
    if values["kv_channels"] is None:
        if hidden % heads:
            raise ModelConfigError(f"hidden_size {hidden} is not divisible by num_attention_heads {heads}; "
                                   "the config needs 'head_dim'")
        values["kv_channels"] = hidden // heads
    if heads % values["num_query_groups"]:
        raise ModelConfigError(f"num_attention_heads {heads} is not divisible by num_key_value_heads "
                               f"{values['num_query_groups']}")
    if hf_config.get("hidden_act", "silu") != "silu":
        raise ModelConfigError(f"unsupported hidden_act {hf_config['hidden_act']!r}; only 'silu' (SwiGLU)")
    prf = hf_config.get("partial_rotary_factor", 1.0)
    if isinstance(prf, bool) or not isinstance(prf, (int, float)) or prf != 1.0:
        raise ModelConfigError(f"partial_rotary_factor {prf!r} is not supported (only 1.0)")
    if hf_config.get("mlp_bias"):
        raise ModelConfigError("mlp_bias=True is not supported")
    values.update(family.fixed)
    if family.translate:
        values.update(family.translate(hf_config))
    try:
        rope = parse_rope(hf_config)
    except RopeConfigError as e:
        raise ModelConfigError(str(e)) from None
    return ModelArgs(architecture=arch, rope=rope, **values)


def read_hf_config(model_dir: str) -> dict:
    path = os.path.join(model_dir, "config.json") if os.path.isdir(model_dir) else model_dir
    if not os.path.isfile(path):
        raise ModelConfigError(f"no config.json in {model_dir}")
    with open(path, encoding="utf-8") as f:
        try:
            cfg = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ModelConfigError(f"{path} must hold a JSON object, got {type(cfg).__name__}")
    return cfg


def hf_config_dict(args: ModelArgs) -> dict:
    """A HF ``config.json`` for ``args`` (used when the source checkpoint carries none; no dtype key)."""
    family = family_of(args)
    cfg = dict(architectures=[args.architecture], model_type=family.model_type, hidden_act="silu",
               **hf_fields(args), **args.rope.to_hf())
    if family.hf_extra:
        cfg.update(family.hf_extra(args))
    return cfg
