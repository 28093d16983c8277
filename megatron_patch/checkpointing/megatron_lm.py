"""Checkpoints written by NVIDIA Megatron-LM itself: unpickling them safely, and their model arguments.

Megatron-LM's ``pretrain_gpt.py`` saves the same layouts as this project (``checkpointing/layout.py``) but

- its ``args`` hold megatron-core enums (``AttnBackend``, ``ModelType``), ``signal.Signals`` and its RNG state
  holds NumPy arrays, which ``torch.load(weights_only=True)`` refuses by default. ``restricted_load`` allows
  exactly megatron-core's own list of safe globals (``megatron/core/safe_globals.py``, imported from the
  installed megatron-core only when a file needs it) and maps Megatron-LM's other enums *by name* to inert
  stand-ins: nothing named by a file is ever imported or run.
- its ``args`` carry no ``model_args``: ``model_args_from_megatron_lm`` builds ``ModelArgs`` from the HF
  config the user names (``--hf-config``; the HF architecture, the true vocab size and the rope scaling, which
  Megatron-LM's args cannot hold) and checks it against every shape field the args do hold, through the one
  field table (``models/config.py``, Megatron-LM spellings included).

Its training checkpoints differ in a few places, resolved here for the trainer's resume: one RNG state shared by
the data-parallel ranks (``rng_states_per_dp_rank``), the consumed samples inside ``args``
(``consumed_train_samples``), and in torch_dist its own layout of the RNG and distributed-optimizer entries
(``sharded_load_layout``).

It also knows what Megatron-LM does *not* restore from a checkpoint (``extra_flags``) and when its stock model
builder cannot reproduce a rope (``stock_rope_problem``), for the converter's advice after writing.
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
import threading
from typing import Any, BinaryIO, Optional, Union

import torch

from megatron_patch.checkpointing.errors import CheckpointError
from megatron_patch.models.config import FIELDS, FIXED_ARCHITECTURE, ModelArgs, layer_pattern, short_repr

# Modules whose enum classes Megatron-LM pickles into ``args`` (megatron-core's two enum modules).
ENUM_MODULES = ("megatron.core.enums", "megatron.core.transformer.enums")
# What megatron-core 0.16's list allows, for a process where megatron-core cannot be imported: the
# standard-library and NumPy types only (its own enums are then stand-ins like any other).
_FALLBACK_SAFE = ("argparse.Namespace", "types.SimpleNamespace", "pathlib.PosixPath", "io.BytesIO",
                  "signal.Signals", "numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct",
                  "numpy.ndarray", "numpy.dtype", "numpy.dtypes.UInt32DType")
_lock = threading.Lock()
_resolved: dict[str, Any] = {}  # pickled name -> what it is allowed as (an object, or (stand-in, name))
_stand_ins: dict[str, type] = {}


class MegatronEnum:
    """An enum member from a Megatron-LM checkpoint, kept as (class path, value) without its class.

    Enums pickle as ``Class(value)``; a stand-in class per path records the value and compares equal to
    another member of the same path and value. ``name`` is unknown (only the value is pickled).
    """

    path = "megatron"

    def __init__(self, value: Any):
        self.value = value

    def __eq__(self, other) -> bool:
        return isinstance(other, MegatronEnum) and (other.path, other.value) == (self.path, self.value)

    def __hash__(self) -> int:
        return hash((self.path, self.value))

    def __repr__(self) -> str:
        return f"<{self.path}: {self.value!r}>"


def _stand_in(path: str) -> type:
    if path not in _stand_ins:
        module, _, name = path.rpartition(".")
        _stand_ins[path] = type(name, (MegatronEnum,), {"path": path, "__module__": __name__})
    return _stand_ins[path]


def _megatron_core_safe_globals() -> dict[str, Any]:
    """megatron-core's own allow-list as {pickled name: object}; the fallback names when it is not importable."""
    import warnings

    try:
        with warnings.catch_warnings():  # megatron-core warns at import about every missing accelerator library
            warnings.simplefilter("ignore")
            from megatron.core.safe_globals import SAFE_GLOBALS
    except Exception:  # noqa: BLE001 - not installed, or broken: fall back to the stdlib/NumPy part
        import importlib

        out = {}
        for name in _FALLBACK_SAFE:
            module, _, attr = name.rpartition(".")
            try:
                out[name] = getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError):
                continue
        return out
    return {f"{g.__module__}.{g.__qualname__}": g for g in SAFE_GLOBALS}


def allow_globals(names: list[str], where: str) -> None:
    """Allow-list (process-wide) the pickled globals ``names`` of one file, or refuse it naming the rest.

    Process-wide on purpose: torch's ``safe_globals`` context manager swaps a global list and so breaks
    loads running in other threads (the converter reads rank files from several). Registered again on every
    call (a set: cheap), because that context manager also removes its globals on exit, wherever they came from.
    """
    unknown = [n for n in names if n not in _resolved]
    if unknown:
        # megatron-core is imported (for its list) only when a file names more than what this project writes.
        safe = _megatron_core_safe_globals() if set(unknown) - {"argparse.Namespace"} else \
            {"argparse.Namespace": argparse.Namespace}
        refused = []
        for name in unknown:
            if name in safe:
                _resolved[name] = safe[name]
            elif name.rpartition(".")[0] in ENUM_MODULES:
                _resolved[name] = (_stand_in(name), name)
            else:
                refused.append(name)
        if refused:
            raise CheckpointError(f"{where}: refusing to unpickle {', '.join(sorted(refused))} (neither in "
                                  "megatron-core's safe globals nor a Megatron-LM enum)")
    with _lock:
        torch.serialization.add_safe_globals([_resolved[n] for n in names])


def allow_file(path: str) -> None:
    """Allow-list what the pickle of ``path`` names (before a reader outside this module, e.g. megatron-core's
    ``dist_checkpointing.load``, unpickles it with ``weights_only``)."""
    if os.path.isfile(path):
        allow_globals(torch.serialization.get_unsafe_globals_in_checkpoint(path), path)


def restricted_load(f: Union[str, BinaryIO], where: Optional[str] = None, mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)`` that also reads Megatron-LM's files (see the module docstring).

    The first attempt allows only ``argparse.Namespace`` (all this project writes); if the file names other
    globals they are checked against the allow-list, registered, and the file is read again.
    """
    where = where or (f if isinstance(f, str) else "checkpoint file")
    allow_globals(["argparse.Namespace"], where)
    try:
        return _load(f, mmap)
    except pickle.UnpicklingError:
        if isinstance(f, str):
            names = torch.serialization.get_unsafe_globals_in_checkpoint(f)
        else:
            f.seek(0)
            names = torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(f.read()))
        allow_globals(names, where)
    return _load(f, mmap)


def _load(f, mmap: bool):
    if not isinstance(f, str):
        f.seek(0)
    return torch.load(f, map_location="cpu", weights_only=True, mmap=mmap)


# ----------------------------------------------------------------------------- model arguments


def is_megatron_lm_args(ns: argparse.Namespace) -> bool:
    """Written by Megatron-LM (or any tool but this project): no ``model_args``."""
    return getattr(ns, "model_args", None) is None


def hf_config_source(hf_config: Optional[str], ns: argparse.Namespace, ckpt_dir: Optional[str]) -> Optional[str]:
    """Where the HF config of a Megatron-LM checkpoint comes from, in order: the user's ``--hf-config``, the
    ``--hf-config`` saved in its args (training with this project's model provider), a ``config.json``
    beside the checkpoint. None when there is none."""
    if hf_config:
        if not os.path.exists(hf_config):
            raise CheckpointError(f"--hf-config {hf_config} does not exist")
        return hf_config
    saved = getattr(ns, "hf_config", None)
    if isinstance(saved, str) and os.path.exists(saved):
        return saved
    if ckpt_dir and os.path.isfile(os.path.join(ckpt_dir, "config.json")):
        return ckpt_dir
    return None


def hf_dir_of(hf_config: Optional[str]) -> Optional[str]:
    """The directory of a ``--hf-config`` (a directory, or the folder of a config.json file)."""
    if hf_config is None:
        return None
    return hf_config if os.path.isdir(hf_config) else os.path.dirname(os.path.abspath(hf_config))


def model_args_from_megatron_lm(ns: argparse.Namespace, hf_config: Optional[str] = None,
                                ckpt_dir: Optional[str] = None, tensors: Optional[int] = None) -> ModelArgs:
    """``ModelArgs`` of a Megatron-LM checkpoint: the HF config, checked against the checkpoint's args."""
    from megatron_patch.models.family import ModelConfigError, args_from_hf, read_hf_config

    source = hf_config_source(hf_config, ns, ckpt_dir)
    if source is None:
        raise CheckpointError(
            "this checkpoint was written by Megatron-LM (its args carry no model_args): pass --hf-config DIR, "
            "the model's HF config.json (and tokenizer), for the HF architecture, the true vocab size and the "
            "rope scaling that Megatron-LM's args do not hold")
    try:
        margs = args_from_hf(read_hf_config(source), tensors)
    except ModelConfigError as e:
        raise CheckpointError(f"--hf-config {source}: {e}") from None
    wrong = disagreements(ns, margs)
    if wrong:
        raise CheckpointError(f"the checkpoint's Megatron-LM args and the HF config {source} disagree: "
                              + "; ".join(wrong))
    return margs


def query_groups(group_query_attention: bool, num_query_groups: Optional[int],
                 num_attention_heads: Optional[int]) -> Optional[int]:
    """Key/value groups as Megatron-LM reads its flags: every head its own group without
    ``--group-query-attention``; with it ``--num-query-groups`` (default 1). ``group_query_attention`` is the
    other direction."""
    return (num_query_groups or 1) if group_query_attention else num_attention_heads


def group_query_attention(margs: ModelArgs) -> bool:
    """Megatron-LM's ``--group-query-attention`` for a model: set unless every head is its own group."""
    return margs.num_query_groups != margs.num_attention_heads


def _effective(ns: argparse.Namespace, name: str):
    """A Megatron-LM arg as its model builder reads it (None: the args do not say)."""
    value = getattr(ns, name, None)
    if name == "num_query_groups":
        return query_groups(getattr(ns, "group_query_attention", False), value,
                            getattr(ns, "num_attention_heads", None))
    heads, hidden = getattr(ns, "num_attention_heads", None), getattr(ns, "hidden_size", None)
    if name == "kv_channels" and value is None and type(heads) is int and type(hidden) is int and heads > 0:
        return hidden // heads
    if name == "add_bias_linear" and value is None and getattr(ns, "disable_bias_linear", None) is not None:
        return not ns.disable_bias_linear
    return value


def disagreements(ns: argparse.Namespace, margs: ModelArgs) -> list[str]:
    """Every field where the checkpoint's Megatron-LM args and ``margs`` differ, as 'name X (checkpoint) vs Y'.

    Fields the args do not hold are not compared. ``max_position_embeddings`` is not compared either: with
    rope it changes no weight and no computation (users often set it to their sequence length).
    """
    wrong = []

    def check(name: str, ckpt, model) -> None:
        if ckpt is None or model is None:
            return
        if isinstance(model, float):  # a string or a bool where the checkpoint must hold a number disagrees too
            number = isinstance(ckpt, (int, float)) and not isinstance(ckpt, bool)
            same = number and abs(float(ckpt) - model) <= 1e-12 * abs(model)
        else:
            same = type(ckpt) is type(model) and ckpt == model
        if not same:
            wrong.append(f"{name} {short_repr(ckpt)} (checkpoint) vs {model!r} (config)")

    for f in FIELDS:
        if not f.mlm_arg or f.name == "max_position_embeddings" or (f.moe and not margs.is_moe and
                                                                    not getattr(ns, "num_experts", None)):
            continue
        check(f.mlm_arg, _effective(ns, f.mlm_arg), getattr(margs, f.name))
    for name, value in FIXED_ARCHITECTURE.items():
        check(name, _effective(ns, name), value)
    check("rotary_base", getattr(ns, "rotary_base", None), margs.rope.theta)
    padded = getattr(ns, "padded_vocab_size", None)
    if padded is not None and padded < margs.vocab_size:
        wrong.append(f"padded_vocab_size {padded} (checkpoint) is smaller than vocab_size {margs.vocab_size} "
                     "(config)")
    if margs.is_moe:
        check("moe_router_pre_softmax", getattr(ns, "moe_router_pre_softmax", None), margs.moe_router_pre_softmax)
        check("moe_layer_freq", layer_pattern(getattr(ns, "moe_layer_freq", None), margs.num_layers),
              margs.moe_layer_pattern)
    return wrong


# ----------------------------------------------------------------------------- its training checkpoints

def rng_states_per_dp_rank(rngs: Optional[list], ns: argparse.Namespace, dp: int) -> Optional[list]:
    """RNG states of a torch rank file by data-parallel rank. Megatron-LM saves one (every DP rank shares it)
    unless it ran with --data-parallel-random-init; this project saves one per DP rank."""
    if rngs and len(rngs) == 1 and is_megatron_lm_args(ns) and not getattr(ns, "data_parallel_random_init", False):
        return list(rngs) * dp
    return rngs


def consumed_train_samples(state: dict) -> int:
    """Samples consumed so far: a top-level entry in this project's checkpoints, inside ``args`` in Megatron-LM's."""
    if "consumed_train_samples" in state:
        return int(state["consumed_train_samples"])
    return int(getattr(state.get("args"), "consumed_train_samples", 0) or 0)


def sharded_load_layout(state: dict, optimizer, iter_dir: str, load_optim: bool, rng: dict) -> None:
    """Ask for the entries of a torch_dist checkpoint written by Megatron-LM in its layout (``state``: the
    sharded state dict to load into, changed in place; ``rng``: this rank's RNG state as the template).

    Its RNG states are one object per (PP, TP) rank shared by the DP ranks (per (PP, TP, DP) rank with expert
    parallelism), and its distributed-optimizer state is sharded as its ``content_metadata`` says.
    """
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    pp, tp = ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()
    pp_rank, tp_rank = ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()
    dp_rank = ps.get_data_parallel_rank(with_context_parallel=True)
    if ps.get_expert_model_parallel_world_size() > 1:
        state["rng_state"] = ShardedObject("rng_state", [rng], (pp, tp, ps.get_data_parallel_world_size()),
                                           (pp_rank, tp_rank, dp_rank), replica_id=0)
    else:
        state["rng_state"] = ShardedObject("rng_state", [rng], (pp, tp), (pp_rank, tp_rank), replica_id=dp_rank)
    if load_optim:
        model_sd = {k: v for k, v in state.items() if k.startswith("model")}
        metadata = (dist_checkpointing.load_content_metadata(iter_dir)
                    or {"distrib_optim_sharding_type": "dp_reshardable"})
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=metadata)


# ----------------------------------------------------------------------------- advice for Megatron-LM users

# Megatron-LM's defaults for flags --use-checkpoint-args does not restore.
_MLM_DEFAULT_NORM_EPS = 1e-5
_STOCK_LLAMA3 = (8.0, 1.0, 4.0, 8192)


def stock_rope_problem(margs: ModelArgs) -> Optional[str]:
    """Why Megatron-LM's own ``gpt_builder`` cannot reproduce this model's rope, or None if it can.

    It passes only ``rope_scaling=--use-rope-scaling`` to GPTModel, whose llama3 scaling is fixed at factor 8,
    low 1, high 4, original 8192, and it has no linear scaling.
    """
    r = margs.rope
    if r.rope_type == "linear":
        return f"linear rope scaling (factor {r.factor:g})"
    if r.rope_type == "llama3":
        got = (r.factor, r.low_freq_factor, r.high_freq_factor, r.original_max_position_embeddings)
        if got != _STOCK_LLAMA3:
            return (f"llama3 rope scaling with factor {got[0]:g}, low {got[1]:g}, high {got[2]:g}, original "
                    f"{got[3]} (Megatron-LM's model builder fixes them at 8, 1, 4, 8192)")
    return None


def extra_flags(margs: ModelArgs, ns: argparse.Namespace) -> list[str]:
    """The Megatron-LM flags a user must pass next to ``--use-checkpoint-args`` to build this model exactly:
    the fields its ``load_args_from_checkpoint`` does not restore, plus how the weights were written."""
    flags = [f"--transformer-impl {getattr(ns, 'transformer_impl', 'local')}"]
    for f in FIELDS:
        if f.mlm_restored or (f.moe and not margs.is_moe):
            continue
        value = getattr(margs, f.name)
        if f.kind is bool:
            if value:
                flags.append(f.flag)
        elif f.name == "norm_epsilon":
            if value != _MLM_DEFAULT_NORM_EPS:
                flags.append(f"{f.flag} {value:g}")
        else:
            flags.append(f"{f.flag} {value:g}")
    if margs.rope.rope_type == "llama3":
        flags.append("--use-rope-scaling")
    if margs.is_moe:
        flags.append("--moe-router-dtype fp32")  # the router softmax in fp32, as HF computes it
        if margs.moe_shared_expert_gate:
            flags.append("--moe-shared-expert-gate")
    if getattr(ns, "bf16", False):
        flags.append("--bf16")
    elif getattr(ns, "fp16", False):
        flags.append("--fp16")
    flags.append("--tokenizer-type HuggingFaceTokenizer --tokenizer-model <dir with the tokenizer>")
    return flags
