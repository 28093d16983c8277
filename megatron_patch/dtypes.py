"""The one table of dtype names: Megatron-LM's (``fp32``/``bf16``/``fp16``), HF ``config.json``'s
(``float32``, ``torch.bfloat16``, ...) and safetensors header codes (``F32``, ``BF16``, ...)."""

from __future__ import annotations

from typing import Optional, Union

import torch

# Megatron-LM's precision names (``--bf16`` etc.; ``params_dtype`` in checkpoint args).
BY_NAME = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NAME_OF = {v: k for k, v in BY_NAME.items()}

# safetensors header codes of the dtypes a checkpoint may hold.
SAFETENSORS = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
               "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
               "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
SAFETENSORS_CODE = {v: k for k, v in SAFETENSORS.items()}

_ALIASES = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}


def parse(name: Union[str, torch.dtype, None], default: str = "fp32") -> torch.dtype:
    """``fp32``/``bf16``/``fp16``, HF's ``float32``/``torch.bfloat16``/..., or a torch dtype -> torch dtype.

    Raises ``ValueError`` naming the accepted names for anything else (e.g. an int8 ``torch_dtype``).
    """
    if name is None:
        name = default
    if isinstance(name, torch.dtype):
        if name not in NAME_OF:
            raise ValueError(f"unsupported parameter dtype {name}; use one of {', '.join(BY_NAME)}")
        return name
    if not isinstance(name, str):
        raise ValueError(f"dtype must be a string, got {type(name).__name__} {name!r}")
    key = name.removeprefix("torch.")
    key = _ALIASES.get(key, key)
    if key not in BY_NAME:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(BY_NAME)}")
    return BY_NAME[key]


def hf_name(dtype: torch.dtype) -> str:
    """The spelling HF writes into ``config.json`` (``bfloat16``)."""
    return str(dtype).removeprefix("torch.")


def hf_config_dtype(config: dict) -> Optional[str]:
    """The dtype a HF ``config.json`` names: ``torch_dtype`` (transformers 4) or ``dtype`` (transformers 5)."""
    return config.get("torch_dtype") or config.get("dtype")


def with_hf_dtype(config: dict, dtype: torch.dtype) -> dict:
    """A copy of a HF config naming ``dtype``, under the key the config already uses (``dtype`` if neither)."""
    out = dict(config)
    out["dtype" if "dtype" in out or "torch_dtype" not in out else "torch_dtype"] = hf_name(dtype)
    return out
