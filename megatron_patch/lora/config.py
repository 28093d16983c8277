"""What a LoRA run adapts and how: ``LoraConfig`` (rank, alpha, dropout, target modules), checked once.

Targets use megatron-core's module names, as Megatron-Bridge and ms-swift spell them: ``linear_qkv``,
``linear_proj``, ``linear_fc1``, ``linear_fc2``; a target names every module of that name (dense MLPs, the
experts and the shared expert of a MoE layer alike); ``all`` is all four. The scale of an adapter is
``alpha / rank``. ``overrides`` gives some module kinds another (rank, alpha), keyed by the kind's name in
the family's weight table (e.g. ``mlp.experts.local_experts.{j}.linear_fc1``): it is only filled when a HF
PEFT adapter with a ``rank_pattern`` is imported (peft on transformers 5 gives fused expert projections twice
the rank), never from the command line.

The config travels inside Megatron checkpoints as ``args`` fields named like the trainer flags
(``lora_rank``, ``lora_alpha``, ``lora_dropout``, ``lora_target_modules``, ``lora_overrides``), so a
checkpoint says which adapters it holds (``to_args`` / ``from_args``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
MLP_TARGETS = ("linear_fc1", "linear_fc2")
ALL = "all"


class LoraError(ValueError):
    """A LoRA request or adapter that cannot be used (the message names why, on one line)."""


@dataclass(frozen=True)
class LoraConfig:
    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = TARGETS
    overrides: tuple[tuple[str, int, float], ...] = field(default=())  # (kind, rank, alpha)

    def __post_init__(self):
        object.__setattr__(self, "targets", resolve_targets(self.targets))
        object.__setattr__(self, "overrides", tuple(sorted((str(k), int(r), float(a)) for k, r, a in self.overrides)))
        for kind, r, _ in ((None, self.rank, self.alpha), *self.overrides):
            if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
                where = f" for {kind}" if kind else ""
                raise LoraError(f"LoRA rank{where} must be a positive integer, got {r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise LoraError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if not self.alpha > 0:
            raise LoraError(f"LoRA alpha must be > 0, got {self.alpha!r}")

    def rank_alpha(self, kind: str) -> tuple[int, float]:
        """(rank, alpha) of the adapters of one module kind (a weight-table name without ``.weight``)."""
        for k, r, a in self.overrides:
            if k == kind:
                return r, a
        return self.rank, float(self.alpha)

    def scale(self, kind: str) -> float:
        r, a = self.rank_alpha(kind)
        return a / r

    @property
    def adapts_mlp(self) -> bool:
        """Whether MLP linears (``linear_fc1`` / ``linear_fc2``: the only ones inside MoE experts) are adapted."""
        return any(t in self.targets for t in MLP_TARGETS)

    def targets_module(self, name: str) -> bool:
        """Whether a linear module named ``name`` (its last path component) is adapted."""
        return name in self.targets

    # ------------------------------------------------------------- checkpoint args

    def to_args(self) -> dict[str, Any]:
        return {"lora_rank": self.rank, "lora_alpha": self.alpha, "lora_dropout": self.dropout,
                "lora_target_modules": list(self.targets),
                "lora_overrides": [list(o) for o in self.overrides] or None}


def from_args(ns: Any) -> Optional[LoraConfig]:
    """The LoRA config stored in a checkpoint's ``args`` (None: the checkpoint holds no adapters)."""
    rank = getattr(ns, "lora_rank", None)
    if not rank:
        return None
    return LoraConfig(rank=int(rank), alpha=float(getattr(ns, "lora_alpha", rank)),
                      dropout=float(getattr(ns, "lora_dropout", 0.0) or 0.0),
                      targets=tuple(getattr(ns, "lora_target_modules", None) or TARGETS),
                      overrides=tuple(tuple(o) for o in (getattr(ns, "lora_overrides", None) or ())))


def resolve_targets(targets: Iterable[str] | str) -> tuple[str, ...]:
    """Target module names, ``all`` expanded; an unknown name is refused naming the known ones."""
    names = [targets] if isinstance(targets, str) else list(targets)
    if not names:
        raise LoraError(f"no LoRA target modules given; choose from {', '.join(TARGETS)} or {ALL}")
    out = []
    for n in names:
        if n == ALL:
            out.extend(TARGETS)
        elif n in TARGETS:
            out.append(n)
        else:
            raise LoraError(f"unknown LoRA target module {n!r}; choose from {', '.join(TARGETS)} or {ALL}")
    return tuple(t for t in TARGETS if t in out)
