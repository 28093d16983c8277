"""HF PEFT adapters (``adapter_config.json`` + ``adapter_model.safetensors``): export and import.

Names come from the family's weight table through ``lora.mapping`` (``base_model.model.`` + the HF module +
``.lora_A.weight``), one pair per HF projection as ``peft`` writes them for ``nn.Linear`` targets; expert
adapters are written per expert (``mlp.experts.{e}.gate_proj``), the form ``peft`` loads on transformers 4
and converts on load for transformers 5's fused experts (there it turns gate/up into one rank-2r
projection). What ``peft`` itself saves for transformers 5 MoE models (``target_parameters`` on the fused
``experts.gate_up_proj`` / ``experts.down_proj``: one A per expert shared by gate and up) is read too and
expanded, exactly, into per-expert gate/up/down pairs (the shared A copied into gate's and up's).

``PeftSource`` is a ``TensorSource`` over an adapter directory, so ``load_into_model`` cuts it for any
layout as it does base weights. A fused layer is adapted as a whole: a projection the adapter leaves out
(``peft``'s default for Llama adapts q_proj and v_proj only) gets A = B = 0, which changes nothing and,
having zero gradients, stays zero in training.

Refused, one line each: ``use_dora``, ``use_rslora``, a bias, ``modules_to_save``, ``fan_in_fan_out``,
tensors the base model has no place for or of the wrong shape (an adapter for another base), ranks that
differ within one fused layer.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Optional

import torch

from megatron_patch.models.mapping import EXPERT, Mapping, iter_tensors
from megatron_patch.lora.config import TARGETS, LoraConfig, LoraError
from megatron_patch.lora.mapping import adapter_weights, kind, peft_module, targets
from megatron_patch.models.config import ModelArgs

PREFIX = "base_model.model."
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
_ALL = LoraConfig(rank=1, alpha=1.0)  # every target module: to list what a model could adapt


# ----------------------------------------------------------------------------- export

def _regex(template: str) -> str:
    """A HF name template (``{i}``/``{e}`` placeholders) as the module regex PEFT's patterns use."""
    return re.escape(template).replace(r"\{i\}", r"\d+").replace(r"\{e\}", r"\d+")


def _number(x: float):
    return int(x) if float(x).is_integer() else float(x)


def peft_config(cfg: LoraConfig, weights: list[Mapping], base_model: Optional[str] = None) -> dict[str, Any]:
    """The ``adapter_config.json`` of adapters ``cfg`` on a model with weight table ``weights``."""
    mods = targets(weights, cfg)
    rank_pattern, alpha_pattern = {}, {}
    for m in mods:
        r, a = cfg.rank_alpha(kind(m))
        if (r, a) == (cfg.rank, float(cfg.alpha)):
            continue
        if m.scope == EXPERT:
            # peft on transformers 5 fuses per-expert gate/up (rank r each) into one rank-2r projection of the
            # stacked experts and sizes it from the global rank; a pattern listed first for the fused name wins.
            fused = "gate_up_proj" if m.n_parts == 2 else "down_proj"
            rank_pattern.setdefault(rf"experts\.{fused}", r * m.n_parts)
            alpha_pattern.setdefault(rf"experts\.{fused}", _number(a * m.n_parts))
        for n in m.hf:
            rank_pattern[_regex(peft_module(n))] = r
            alpha_pattern[_regex(peft_module(n))] = _number(a)
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "revision": None,
        "r": cfg.rank, "lora_alpha": _number(cfg.alpha), "lora_dropout": cfg.dropout,
        "target_modules": sorted({peft_module(n).rsplit(".", 1)[-1] for m in mods for n in m.hf}),
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
    }


def peft_tensors(src, cfg: LoraConfig, dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """Every adapter tensor of ``src`` (a source holding adapters) under its PEFT name."""
    out = {}
    for m, layer, expert in iter_tensors(adapter_weights(src.weights, cfg), src.args):
        for name, t in zip(m.hf_names(layer, expert), m.to_hf(src.parts(m, layer, expert), src.args)):
            out[PREFIX + name] = (t if dtype is None else t.to(dtype)).contiguous()
    return out


def write_peft(src, out_dir: str, cfg: LoraConfig, dtype: Optional[torch.dtype] = None,
               base_model: Optional[str] = None) -> None:
    """Write the adapters held by ``src`` as a PEFT adapter directory (``out_dir`` exists, e.g. a temporary)."""
    from safetensors.torch import save_file

    save_file(peft_tensors(src, cfg, dtype), os.path.join(out_dir, WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(out_dir, CONFIG), "w") as f:
        json.dump(peft_config(cfg, src.weights, base_model), f, indent=2)


# ----------------------------------------------------------------------------- import

_REFUSED = {"use_dora": "DoRA", "use_rslora": "rank-stabilised LoRA (use_rslora)", "fan_in_fan_out": "fan_in_fan_out",
            "lora_bias": "LoRA biases (lora_bias)"}
# transformers 5 stacks experts: ``experts.gate_up_proj`` [E, 2I, H] ([gate; up] rows) and ``experts.down_proj``
# [E, H, I], registered in this order, so peft nests their wrappers with gate_up_proj innermost.
_FUSED_EXPERT_PARAMS = ("gate_up_proj", "down_proj")
_FUSED_KEY = re.compile(r"^(?P<module>.*\.layers\.(?P<layer>\d+)\..*experts)\.(?P<nest>(?:base_layer\.)*)"
                        r"(?P<ab>lora_[AB])\.weight$")


def read_peft_config(adapter_dir: str) -> dict:
    path = os.path.join(adapter_dir, CONFIG)
    if not os.path.isfile(path):
        raise LoraError(f"{adapter_dir} is not a PEFT adapter: it has no {CONFIG}")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise LoraError(f"cannot read {path}: {e}") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise LoraError(f"{path}: peft_type {cfg.get('peft_type')!r} is not LORA")
    for key, what in _REFUSED.items():
        if cfg.get(key):
            raise LoraError(f"{path}: {what} is not supported")
    if cfg.get("bias", "none") != "none":
        raise LoraError(f"{path}: bias={cfg['bias']!r} is not supported (only 'none')")
    if cfg.get("modules_to_save"):
        raise LoraError(f"{path}: modules_to_save {cfg['modules_to_save']} is not supported (adapters only)")
    if not isinstance(cfg.get("r"), int) or cfg["r"] <= 0:
        raise LoraError(f"{path}: r must be a positive integer, got {cfg.get('r')!r}")
    return cfg


def _pattern(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern rule: a key matches a module name it ends (after a dot) with."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _expand_fused_experts(tensors: dict, cfg: dict, weights: list[Mapping], args: ModelArgs,
                          ranks: dict) -> dict[str, torch.Tensor]:
    """transformers-5 PEFT expert tensors -> per-expert gate/up/down pairs under the weight table's names."""
    params = [p for p in _FUSED_EXPERT_PARAMS
              if any(str(t) == p or str(t).endswith("." + p) for t in (cfg.get("target_parameters") or ()))]
    expert_maps = {m.n_parts: m for m in targets(weights, _ALL) if m.scope == EXPERT}  # 2: fc1, 1: fc2
    out = {}
    for name in list(tensors):
        match = _FUSED_KEY.match(name)
        if not match or not params:
            continue
        depth = match["nest"].count("base_layer.")
        if depth >= len(params):
            raise LoraError(f"adapter tensor {name}: more nesting than its target_parameters {params}")
        param = params[len(params) - 1 - depth]
        m = expert_maps.get(2 if param == "gate_up_proj" else 1)
        if m is None:
            raise LoraError(f"adapter tensor {name} adapts experts, but this model has none")
        t, layer, E = tensors.pop(name), int(match["layer"]), args.num_experts
        rank = (t.shape[0] if match["ab"] == "lora_A" else t.shape[1]) // E
        ranks.setdefault(kind(m), set()).add((rank, _pattern(cfg.get("alpha_pattern"), f"{match['module']}.{param}",
                                                             cfg.get("lora_alpha", cfg["r"]))))
        for e in range(E):
            names = m.hf_names(layer, e)
            if match["ab"] == "lora_A":  # [E * R, in]: expert-major rows
                per = t.reshape(E, rank, t.shape[1])[e]
                pieces = [per] * len(names)
            else:  # [out, R * E]: expert-minor columns
                per = t.reshape(t.shape[0], rank, E)[:, :, e]
                pieces = list(torch.chunk(per, len(names), dim=0))
            for n, piece in zip(names, pieces):
                out[f"{peft_module(n)}.{match['ab']}.weight"] = piece.contiguous()
    return out


class PeftSource:
    """The adapter tensors of a HF PEFT directory, as Megatron adapter mappings' whole parts.

    ``args``: the base model's ``ModelArgs`` (the adapter's shapes are checked against them). ``config``:
    the ``LoraConfig`` the adapter implies (rank, alpha, targets, per-kind overrides from its patterns).
    """

    def __init__(self, adapter_dir: str, args: ModelArgs):
        from safetensors.torch import load_file

        from megatron_patch.models.family import family_of

        self.dir, self.args = adapter_dir, args
        self.weights = family_of(args).weights(args)
        raw = read_peft_config(adapter_dir)
        path = os.path.join(adapter_dir, WEIGHTS)
        if not os.path.isfile(path):
            raise LoraError(f"{adapter_dir} has no {WEIGHTS}")
        try:
            tensors = {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in load_file(path).items()}
        except Exception as e:  # safetensors raises its own types for a damaged file
            raise LoraError(f"cannot read {path}: {e}") from None
        ranks: dict[str, set] = {}
        expanded = _expand_fused_experts(tensors, raw, self.weights, args, ranks)
        tensors.update(expanded)
        self.tensors = tensors
        self.config = self._config(raw, ranks, set(expanded))
        self._check_all_placed()

    def _config(self, raw: dict, ranks: dict, expanded: set) -> LoraConfig:
        """Targets: the modules with at least one tensor; ranks from the tensors, alphas from the patterns."""
        alpha = raw.get("lora_alpha", raw["r"])
        adapted = set(ranks)
        for m in targets(self.weights, _ALL):
            for i in range(self.args.num_layers):
                if not m.applies(self.args, i):
                    continue
                for e in (range(self.args.num_experts) if m.scope == EXPERT else (None,)):
                    for n in m.hf_names(i, e):
                        name = f"{peft_module(n)}.lora_A.weight"
                        a = self.tensors.get(name)
                        if a is None or name in expanded:
                            continue
                        adapted.add(kind(m))
                        pattern_alpha = _pattern(raw.get("alpha_pattern"), peft_module(n), alpha)
                        ranks.setdefault(kind(m), set()).add((a.shape[0], pattern_alpha))
        if not adapted:
            raise LoraError(f"{self.dir}: no adapter tensor matches a linear of this {self.args.architecture} "
                            "model (an adapter for another base model?)")
        overrides = []
        for k, values in sorted(ranks.items()):
            if len(values) > 1:
                raise LoraError(f"{self.dir}: the adapters of {k} have different ranks/alphas {sorted(values)}; "
                                "one fused Megatron layer needs one rank")
            r, a = next(iter(values))
            if (r, float(a)) != (raw["r"], float(alpha)):
                overrides.append((k, r, float(a)))
        names = {k.rsplit(".", 1)[-1] for k in adapted}
        return LoraConfig(rank=raw["r"], alpha=float(alpha), dropout=float(raw.get("lora_dropout") or 0.0),
                          targets=tuple(t for t in TARGETS if t in names), overrides=tuple(overrides))

    def _check_all_placed(self) -> None:
        """Every tensor has a place in this model, with the shape the place needs."""
        expected = set()
        for m, layer, expert in iter_tensors(adapter_weights(self.weights, self.config), self.args):
            names = m.hf_names(layer, expert)
            expected.update(names)
            for name, shape in zip(names, m.shapes(self.args)):
                t = self.tensors.get(name)
                if t is not None and tuple(t.shape) != tuple(shape):
                    r_dim = 1 if name.endswith(".lora_B.weight") else 0  # A is [r, in], B is [out, r]
                    what = "rank" if t.shape[1 - r_dim] == shape[1 - r_dim] else "base model"
                    raise LoraError(f"adapter tensor {PREFIX}{name} has shape {tuple(t.shape)}, expected "
                                    f"{tuple(shape)} for this {self.args.architecture} (an adapter for another {what})")
        extra = sorted(set(self.tensors) - expected)
        if extra:
            more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
            raise LoraError(f"{self.dir} holds adapter tensors this {self.args.architecture} model has no place for: "
                            f"{', '.join(PREFIX + n for n in extra[:3])}{more} (an adapter for another base model?)")

    def fork(self) -> "PeftSource":
        return self

    def rank_slice(self, m: Mapping, layer: Optional[int], expert: Optional[int], tp: int, rank: int,
                   padded_vocab: int) -> None:
        return None  # tensors held whole in memory: the caller cuts its slice from ``parts``

    def stored_shards(self, m: Mapping, layer: Optional[int], expert: Optional[int] = None) -> None:
        return None

    def stage_of(self, m: Mapping, layer: Optional[int]) -> int:
        return 0

    def release(self) -> None:
        pass

    def parts(self, m: Mapping, layer: Optional[int] = None, expert: Optional[int] = None) -> list[torch.Tensor]:
        hf = []
        for name, shape in zip(m.hf_names(layer, expert), m.shapes(self.args)):
            t = self.tensors.get(name)
            if t is None:  # a projection of a fused layer the adapter left out: A = B = 0 changes nothing
                dtype = next(iter(self.tensors.values())).dtype
                t = torch.zeros(shape, dtype=dtype)
            elif tuple(t.shape) != tuple(shape):  # a config other than the adapter's own
                raise LoraError(f"adapter tensor {PREFIX}{name} has shape {tuple(t.shape)}, expected {tuple(shape)} "
                                f"(adapters of another rank)")
            hf.append(t)
        return m.to_megatron(hf, self.args)


def check_same_config(want: LoraConfig, have: LoraConfig, where: str) -> None:
    """Refuse adapters whose rank, alpha or targets differ from the run's LoRA settings (one line)."""
    if (want.rank, want.overrides) != (have.rank, have.overrides):
        raise LoraError(f"{where} holds rank-{have.rank} adapters, but the LoRA rank here is {want.rank} "
                        "(--lora-rank)" if want.rank != have.rank else
                        f"{where} holds adapters with other per-module ranks {have.overrides}")
    if float(want.alpha) != float(have.alpha):
        raise LoraError(f"{where} holds adapters with alpha {have.alpha}, but the LoRA alpha here is {want.alpha}")
    if want.targets != have.targets:
        raise LoraError(f"{where} adapts {', '.join(have.targets)}, but the LoRA targets here are "
                        f"{', '.join(want.targets)}")


__all__ = ["PeftSource", "write_peft", "peft_tensors", "peft_config", "read_peft_config", "check_same_config"]
