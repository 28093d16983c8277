"""HF rope configurations -> rotary inverse frequencies, computed exactly as HF does.

Why not megatron-core's own ``rope_scaling``: upstream hard-codes Llama-3's low/high frequency factors
(1, 4) and original context (8192) and only lets the factor vary. A config with other values would
silently get different frequencies. We compute ``inv_freq`` here from every field of the HF config and
install it on megatron's ``RotaryEmbedding`` after construction (see ``builder.install_rope_frequencies``).

Accepts both config shapes: transformers 4.x (``rope_theta`` and ``rope_scaling`` at top level) and
5.x (``rope_parameters`` holding ``rope_type``, ``rope_theta`` and the scaling fields).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class RopeConfigError(ValueError):
    pass


@dataclass(frozen=True)
class RopeSpec:
    theta: float = 10000.0
    rope_type: str = "default"
    factor: Optional[float] = None
    low_freq_factor: Optional[float] = None
    high_freq_factor: Optional[float] = None
    original_max_position_embeddings: Optional[int] = None

    def __post_init__(self) -> None:
        """A spec from anywhere (a HF config through ``parse_rope``, a checkpoint's ``model_args``) must give
        finite, positive frequencies: the same checks as ``parse_rope``'s, on the stored values."""
        where = "rope argument"
        object.__setattr__(self, "theta", _number(self.theta, f"{where} 'theta'"))
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise RopeConfigError(f"unsupported rope type {self.rope_type!r}; supported: "
                                  f"{', '.join(SUPPORTED_ROPE_TYPES)}")
        needed = {"default": (), "linear": ("factor",),
                  "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
        for name in needed[self.rope_type]:
            value = getattr(self, name)
            if value is None:
                raise RopeConfigError(f"rope type {self.rope_type!r} needs {name!r}")
            object.__setattr__(self, name, _number(value, f"{where} {name!r}",
                                                   integer=name == "original_max_position_embeddings"))
        if self.rope_type == "llama3" and self.low_freq_factor >= self.high_freq_factor:
            # The smooth band between them would divide by zero (or invert): NaN/garbage frequencies.
            raise RopeConfigError(f"rope low_freq_factor ({self.low_freq_factor}) must be smaller than "
                                  f"high_freq_factor ({self.high_freq_factor})")

    def to_hf(self) -> dict:
        """The transformers 4.x-style pair (``rope_theta``, ``rope_scaling``) for this spec."""
        scaling = None
        if self.rope_type == "linear":
            scaling = {"rope_type": "linear", "factor": self.factor}
        elif self.rope_type == "llama3":
            scaling = {
                "rope_type": "llama3",
                "factor": self.factor,
                "low_freq_factor": self.low_freq_factor,
                "high_freq_factor": self.high_freq_factor,
                "original_max_position_embeddings": self.original_max_position_embeddings,
            }
        return {"rope_theta": self.theta, "rope_scaling": scaling}


def _number(value, where: str, integer: bool = False) -> float:
    """A positive JSON number (an integer when ``integer``); anything else names the field in the error."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RopeConfigError(f"{where} must be a number, got {type(value).__name__} {value!r}")
    if not value > 0 or value == float("inf"):  # NaN fails the first test
        raise RopeConfigError(f"{where} must be a positive number, got {value!r}")
    if integer and value != int(value):
        raise RopeConfigError(f"{where} must be an integer, got {value!r}")
    return int(value) if integer else float(value)


def parse_rope(hf_config: dict) -> RopeSpec:
    """Read the rope settings of a HF ``config.json`` dict (4.x or 5.x shape), every value type-checked."""
    params = hf_config.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        raise RopeConfigError(f"config field 'rope_parameters' must be an object, got {type(params).__name__} "
                              f"{params!r}")
    if isinstance(params, dict):
        scaling, where = params, "rope_parameters"
        theta = params.get("rope_theta", hf_config.get("rope_theta", 10000.0))
    else:
        scaling, where = hf_config.get("rope_scaling"), "rope_scaling"
        if scaling is None:
            scaling = {}
        elif not isinstance(scaling, dict):
            raise RopeConfigError(f"config field 'rope_scaling' must be an object or null, got "
                                  f"{type(scaling).__name__} {scaling!r}")
        theta = hf_config.get("rope_theta", 10000.0)
    theta = _number(theta, "config field 'rope_theta'")
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) or "default"
    if not isinstance(rope_type, str):
        raise RopeConfigError(f"config field '{where}.rope_type' must be a string, got {rope_type!r}")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise RopeConfigError(
            f"unsupported rope type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "default":
        return RopeSpec(theta=theta)

    def need(key, integer: bool = False):
        if scaling.get(key) is None:
            raise RopeConfigError(f"rope type {rope_type!r} needs {key!r} in the rope scaling config")
        return _number(scaling[key], f"config field '{where}.{key}'", integer)

    if rope_type == "linear":
        return RopeSpec(theta=theta, rope_type="linear", factor=need("factor"))
    factor, low, high = need("factor"), need("low_freq_factor"), need("high_freq_factor")
    if low >= high:  # also refused by RopeSpec; here the message names the config's own keys
        raise RopeConfigError(f"config field '{where}.low_freq_factor' ({low}) must be smaller than "
                              f"'{where}.high_freq_factor' ({high})")
    return RopeSpec(theta=theta, rope_type="llama3", factor=factor, low_freq_factor=low, high_freq_factor=high,
                    original_max_position_embeddings=need("original_max_position_embeddings", integer=True))


def inv_freq(spec: RopeSpec, rotary_dim: int) -> torch.Tensor:
    """fp32 inverse frequencies ``[rotary_dim // 2]``, bit-identical to transformers' computation."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).to(dtype=torch.float) / rotary_dim
    freq = 1.0 / (spec.theta**exponents)
    if spec.rope_type == "linear":
        return freq / spec.factor
    if spec.rope_type == "llama3":
        factor, lo, hi = spec.factor, spec.low_freq_factor, spec.high_freq_factor
        old_len = spec.original_max_position_embeddings
        low_freq_wavelen = old_len / lo
        high_freq_wavelen = old_len / hi
        wavelen = 2 * math.pi / freq
        # Long wavelengths (low frequencies) are divided by the factor, short ones kept, and the band
        # between them interpolated smoothly.
        scaled = torch.where(wavelen > low_freq_wavelen, freq / factor, freq)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    return freq
