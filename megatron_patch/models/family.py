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
import os
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from megatron_patch.models.config import (ModelArgs, ModelConfigError, check_against_checkpoint, differences,
                                          hf_fields, read_fields)
from megatron_patch.models.rope import RopeConfigError, parse_rope

__all__ = ["Family", "ModelArgs", "ModelConfigError", "register", "get_family", "supported_architectures",
           "args_from_hf", "read_hf_config", "hf_config_dict", "family_of", "check_config_agrees"]


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


def args_from_hf(hf_config: dict, tensors: Optional[int] = None) -> ModelArgs:
    """Translate a HF config dict (transformers 4.x or 5.x shape) into ``ModelArgs``.

    ``tensors``: how many tensors the checkpoint this config describes holds; the layer and expert counts are
    checked against it before anything is built per layer (``config.check_against_checkpoint``).
    """
    arch = _architecture(hf_config)
    family = get_family(arch)
    if family.validate:
        family.validate(hf_config)
    values = read_fields(hf_config)
    if tensors is not None and values["num_layers"] > tensors:  # before the family's per-layer pattern
        raise ModelConfigError(f"config field 'num_hidden_layers' is {values['num_layers']}, but the checkpoint "
                               f"holds only {tensors} tensors (at least one per layer)")
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
    args = ModelArgs(architecture=arch, rope=rope, **values)
    if tensors is not None:
        check_against_checkpoint(args, "the checkpoint", tensors)
    return args


def read_hf_config(model_dir: str) -> dict:
    from megatron_patch import jsonio

    path = os.path.join(model_dir, "config.json") if os.path.isdir(model_dir) else model_dir
    if not os.path.isfile(path):
        raise ModelConfigError(f"no config.json in {model_dir}")
    try:
        cfg = jsonio.load_file(path)
    except jsonio.JSONError as e:
        raise ModelConfigError(str(e)) from None
    if not isinstance(cfg, dict):
        raise ModelConfigError(f"{path} must hold a JSON object, got {type(cfg).__name__}")
    return cfg


def check_config_agrees(hf_config: dict, args: ModelArgs, config_name: str, args_name: str) -> None:
    """One source of truth: a HF config shipped beside a checkpoint (or given with it) must describe the model
    the checkpoint's own arguments describe; every disagreeing field is named."""
    try:
        theirs = args_from_hf(hf_config)
    except ModelConfigError as e:
        raise ModelConfigError(f"{config_name}: {e}") from None
    wrong = differences(theirs, args, config_name, args_name)
    if wrong:
        raise ModelConfigError(f"{config_name} and {args_name} describe different models: " + "; ".join(wrong))


def hf_config_dict(args: ModelArgs) -> dict:
    """A HF ``config.json`` for ``args`` (used when the source checkpoint carries none; no dtype key)."""
    family = family_of(args)
    cfg = dict(architectures=[args.architecture], model_type=family.model_type, hidden_act="silu",
               **hf_fields(args), **args.rope.to_hf())
    if family.hf_extra:
        cfg.update(family.hf_extra(args))
    return cfg
