"""Comparing HF checkpoints tensor by tensor (tests, benchmarks, the quickstart)."""

from __future__ import annotations

import os

import torch


def hf_tensors(model_dir: str) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors shards in ``model_dir``."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(os.listdir(model_dir)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(model_dir, f)))
    return out


def differences(a: dict, b: dict) -> list[str]:
    """Names that are missing on one side or differ in dtype or any bit."""
    names = sorted(set(a) ^ set(b))
    names += [k for k in sorted(set(a) & set(b)) if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    return names


def assert_same_tensors(a: dict, b: dict) -> None:
    diff = differences(a, b)
    assert not diff, f"{len(diff)} tensors differ, e.g. {diff[:5]}"
