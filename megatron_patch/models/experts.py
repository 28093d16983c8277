"""Grouped-GEMM experts for megatron-core's ``MoELayer`` on the local spec (no Transformer Engine needed).

megatron-core's local spec runs its experts as a ``SequentialMLP`` (one small GEMM per expert and a host sync
for the split sizes); its old ``GroupedMLP`` needs the ``grouped_gemm`` package, and 0.17+ has no grouped
training path without TE. ``TorchGroupedMLP`` plugs into the same ``MoESubmodules.experts`` slot and computes
the same math as SequentialMLP: one grouped GEMM for fc1 (gate and up together), SwiGLU times the routing
probabilities, one grouped GEMM for fc2 (``fusions/grouped_mm.py``: torch's ``grouped_mm`` where it runs).

Weights: the local experts' matrices are stacked in ONE parameter per projection, each expert's slice in
``nn.Linear``'s layout and cut over expert-TP ranks as megatron cuts a SequentialMLP's (and TE's grouped linear):
- ``fc1_weight`` ``[local experts, 2 * ffn / ETP, hidden]``, expert j's rows ``[gate_r; up_r]`` of ETP rank r;
- ``fc2_weight`` ``[local experts, hidden, ffn / ETP]`` (row-parallel: ETP rank r holds columns block r).
No communication happens here: the token dispatcher gathers the inputs over expert-TP ranks and reduces the
partial fc2 outputs, exactly as for megatron's own expert modules.

Checkpoints: the module's ``state_dict`` is SequentialMLP's (``local_experts.{j}.linear_fc1.weight``, views of the
stacked parameter, plus its ``_extra_state`` entries), so torch-format rank files, the converter, ``load_into_model``
and ``--save-hf`` see the local spec's existing layout and interchange with SequentialMLP checkpoints both ways; it
also loads its own stacked names. ``sharded_state_dict`` (torch_dist) gives the ShardedTensors SequentialMLP gives
(global expert axis, gate/up halves as megatron's SwiGLU factory splits them) through one ``ShardedTensorFactory``
per stacked parameter, so optimizer states, which megatron maps per parameter, go through it too.

Extensions: ``projection_branches`` adds terms to a projection's output over the same token groups, and modules
placed at SequentialMLP's ``local_experts.{j}.<projection>`` paths save, load and shard themselves under those
names; LoRA uses both (``lora/grouped.py``), so its expert adapters look exactly like SequentialMLP's.
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F

from megatron.core.transformer.module import MegatronModule

from megatron_patch.fusions import grouped_mm

_PROJECTIONS = (("fc1_weight", "linear_fc1"), ("fc2_weight", "linear_fc2"))


def _unsupported(config) -> list[str]:
    """Options of ``config`` this module does not implement (each refused by name)."""
    checks = [
        ("add_bias_linear", config.add_bias_linear, "expert biases"),
        ("moe_latent_size", getattr(config, "moe_latent_size", None) is not None, "latent expert projections"),
        ("fp8", bool(getattr(config, "fp8", None)), "FP8 (use Transformer Engine's grouped MLP)"),
        ("fp4", bool(getattr(config, "fp4", None)), "FP4 (use Transformer Engine's grouped MLP)"),
        ("use_te_activation_func", bool(getattr(config, "use_te_activation_func", False)), "TE activations"),
        ("activation_func_clamp_value", getattr(config, "activation_func_clamp_value", None) is not None,
         "clamped GLU"),
        ("glu_linear_offset", bool(getattr(config, "glu_linear_offset", 0.0)), "GLU linear offsets"),
    ]
    return [f"{name} ({what})" for name, bad, what in checks if bad]


class TorchGroupedMLP(MegatronModule):
    """The local experts of one MoE layer as two grouped GEMMs (see the module docstring)."""

    def __init__(self, num_local_experts: int, config, submodules=None, pg_collection=None,
                 name: Optional[str] = None):
        super().__init__(config=config)
        bad = _unsupported(config)
        if bad:
            raise ValueError("grouped-GEMM experts on the local spec do not support: " + ", ".join(bad))
        if pg_collection is None:
            from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

            pg_collection = get_default_pg_collection()
        self.num_local_experts = num_local_experts
        self.ep_group, self.tp_group, self.dp_group = pg_collection.ep, pg_collection.expt_tp, pg_collection.expt_dp
        self.activation_recompute = (config.recompute_granularity == "selective"
                                     and "moe_act" in (config.recompute_modules or ()))
        etp, etp_rank = self.tp_group.size(), self.tp_group.rank()
        ffn = config.moe_ffn_hidden_size
        if ffn % etp:
            raise ValueError(f"moe_ffn_hidden_size {ffn} is not divisible by expert tensor parallel size {etp}")
        fc1_out = ffn * (2 if config.gated_linear_unit else 1)
        shapes = {"fc1_weight": (fc1_out // etp, config.hidden_size), "fc2_weight": (config.hidden_size, ffn // etp)}
        device = None if config.use_cpu_initialization else torch.cuda.current_device()
        for attr, shape in shapes.items():
            p = torch.nn.Parameter(torch.empty(num_local_experts, *shape, dtype=config.params_dtype, device=device))
            # Attributes megatron reads off expert weights: expert-parallel grads/optimizer (allreduce False with
            # EP > 1, as its linears set it), tensor-parallel (grad norms count each shard once).
            p.allreduce = not config.expert_model_parallel_size > 1
            p.tensor_model_parallel, p.partition_dim = True, 1 if attr == "fc1_weight" else 2
            p.partition_stride = 2 if attr == "fc1_weight" and config.gated_linear_unit else 1  # [gate_r; up_r]
            self.register_parameter(attr, p)
        if config.perform_initialization:
            self._initialize(fc1_out, ffn, etp, etp_rank)
        # Terms added to a projection's output over the same token groups, by projection name ("linear_fc1"...):
        # callables (x, tokens_per_expert, offsets) -> [tokens, out] or None. LoRA puts its adapters here
        # (lora/grouped.py), with their per-expert parameters under ``local_experts.{j}.<projection>``.
        self.projection_branches: dict = {}

    @torch.no_grad()
    def _initialize(self, fc1_out: int, ffn: int, etp: int, etp_rank: int) -> None:
        """Each expert's slice initialized as SequentialMLP initializes its linears, in the same order (expert by
        expert, fc1 then fc2), so a model built from scratch gets the same weights either way."""
        from megatron.core.tensor_parallel.layers import _initialize_affine_weight_cpu, _initialize_affine_weight_gpu

        cfg, hidden = self.config, self.config.hidden_size
        # megatron's MLP cuts a gated fc1 with stride 2: rank r's rows are [gate_r; up_r] of the whole [gate; up].
        fc1_stride = 2 if cfg.gated_linear_unit else 1
        for j in range(self.num_local_experts):
            for w, init, out_size, in_size, dim, stride in (
                    (self.fc1_weight[j], cfg.init_method, fc1_out, hidden, 0, fc1_stride),
                    (self.fc2_weight[j], cfg.output_layer_init_method, hidden, ffn, 1, 1)):
                if cfg.use_cpu_initialization:
                    _initialize_affine_weight_cpu(w, out_size, in_size, w.shape[dim], dim, init, stride=stride,
                                                  params_dtype=cfg.params_dtype, rank=etp_rank, world_size=etp)
                else:
                    _initialize_affine_weight_gpu(w, init, partition_dim=dim, stride=stride, is_expert=True)

    # ------------------------------------------------------------------ forward

    def _activation(self, fc1: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """act(gate) * up (or act(x)), times each token's routing probability: MLP's expert path in megatron."""
        cfg = self.config
        if cfg.bias_activation_fusion and cfg.gated_linear_unit and cfg.activation_func is F.silu:
            from megatron.core.fusions.fused_bias_swiglu import weighted_bias_swiglu_impl

            return weighted_bias_swiglu_impl(fc1, None, probs.unsqueeze(-1), cfg.activation_func_fp8_input_store)
        if cfg.gated_linear_unit:
            gate, up = torch.chunk(fc1, 2, dim=-1)
            h = cfg.activation_func(gate) * up
        else:
            h = cfg.activation_func(fc1)
        return (h * probs.unsqueeze(-1)).to(h.dtype)

    def forward(self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert: torch.Tensor,
                permuted_probs: torch.Tensor):
        """``[tokens, hidden]`` sorted by local expert -> ``([tokens, hidden], None)`` (partial sums over ETP)."""
        x, probs = permuted_local_hidden_states, permuted_probs
        if self.config.moe_apply_probs_on_input:
            x = (probs.unsqueeze(-1) * x).to(x.dtype)
            probs = torch.ones_like(probs)
        offs = None
        if grouped_mm.kernel_usable(x, self.fc1_weight):  # one set of device offsets for both GEMMs
            offs = grouped_mm.offsets(tokens_per_expert, x.device)
        fc1 = self._project("fc1_weight", "linear_fc1", x, tokens_per_expert, offs)
        if self.activation_recompute:
            from megatron.core.tensor_parallel import CheckpointWithoutOutput

            ckpt = CheckpointWithoutOutput(fp8=None)  # None: no FP8 state to save (which would need TE)
            h = ckpt.checkpoint(self._activation, fc1, probs)
            out = self._project("fc2_weight", "linear_fc2", h, tokens_per_expert, offs)
            ckpt.discard_output_and_register_recompute(out)  # on the sum: before any of h's users runs backward
        else:
            out = self._project("fc2_weight", "linear_fc2", self._activation(fc1, probs), tokens_per_expert, offs)
        return out, None

    def _project(self, attr: str, linear: str, x: torch.Tensor, tokens_per_expert: torch.Tensor,
                 offs: Optional[torch.Tensor]) -> torch.Tensor:
        """One grouped GEMM, plus the projection's branch (``projection_branches``) where one is set."""
        out = grouped_mm.grouped_linear(x, getattr(self, attr), tokens_per_expert, offs)
        branch = self.projection_branches.get(linear)
        extra = None if branch is None else branch(x, tokens_per_expert, offs)
        return out if extra is None else out + extra

    def backward_dw(self):
        """Weight gradients are computed in the backward pass itself (megatron's delayed-wgrad hook: nothing)."""

    # ------------------------------------------------------------------ state dict (SequentialMLP's names)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for j in range(self.num_local_experts):
            for attr, linear in _PROJECTIONS:
                destination[f"{prefix}local_experts.{j}.{linear}.weight"] = getattr(self, attr)[j].detach()
                destination[f"{prefix}local_experts.{j}.{linear}._extra_state"] = None  # megatron's linears' value

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        used = set()

        def put(key: str, target: torch.Tensor) -> None:
            value = state_dict[key]
            if tuple(value.shape) != tuple(target.shape):
                error_msgs.append(f"size mismatch for {key}: checkpoint {tuple(value.shape)}, "
                                  f"model {tuple(target.shape)}")
            else:
                with torch.no_grad():
                    target.copy_(value)
            used.add(key)

        for attr, linear in _PROJECTIONS:
            param = getattr(self, attr)
            if prefix + attr in state_dict:  # the stacked parameter (what a torch_dist load hands back)
                put(prefix + attr, param)
                continue
            for j in range(self.num_local_experts):
                key = f"{prefix}local_experts.{j}.{linear}.weight"
                if key in state_dict:
                    put(key, param[j])
                else:
                    missing_keys.append(key)
        for key in state_dict:
            if key.startswith(prefix) and key not in used and not self._held_by_submodule(key[len(prefix):]):
                if key.endswith("._extra_state") and key.startswith(prefix + "local_experts."):
                    continue
                unexpected_keys.append(key)

    def _held_by_submodule(self, name: str) -> bool:
        """Whether ``name`` is a parameter or buffer of a submodule (e.g. a LoRA adapter's), which loads itself."""
        path, _, leaf = name.rpartition(".")
        try:
            module = self.get_submodule(path) if path else None
        except AttributeError:
            return False
        return module is not None and (leaf in module._parameters or leaf in module._buffers)

    # ------------------------------------------------------------------ torch_dist

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """SequentialMLP's ShardedTensors (global expert axis after ``sharded_offsets``, expert-TP split, gate/up
        halves of fc1 at ``[gate_all; up_all]``) from one factory per stacked parameter."""
        from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
        from megatron.core.transformer.utils import make_sharded_object_for_checkpoint

        if (metadata or {}).get("singleton_local_shards"):
            raise NotImplementedError("grouped-GEMM experts save the global-expert-axis layout only "
                                      "(singleton_local_shards is not supported)")
        layout = _ExpertLayout(self, sharded_offsets)
        out = {}
        for attr, linear in _PROJECTIONS:
            split = "swiglu" if attr == "fc1_weight" and self.config.gated_linear_unit else \
                ("rows" if attr == "fc1_weight" else "columns")
            out[prefix + attr] = ShardedTensorFactory(
                f"{prefix}experts.{linear}.weight", getattr(self, attr), partial(layout.build, split=split),
                partial(layout.merge, split=split), layout.replica_id)
            for j in range(self.num_local_experts):
                out[f"{prefix}local_experts.{j}.{linear}._extra_state"] = make_sharded_object_for_checkpoint(
                    None, f"{prefix}experts.{linear}._extra_state", layout.expert_offsets(j),
                    (0, layout.etp_rank, layout.edp_rank))
        out.update(self._submodule_sharded_state(prefix, layout, metadata))
        return out

    def _submodule_sharded_state(self, prefix: str, layout: "_ExpertLayout", metadata: Optional[dict]) -> dict:
        """What modules placed at SequentialMLP's ``local_experts.{j}.<projection>`` (LoRA adapters) save, made as
        SequentialMLP makes its experts' entries: the expert's offsets, ``local_experts.{j}.`` keys saved as
        ``experts.``, the replica id's data-parallel part the expert-DP rank."""
        from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding

        slots = self._modules.get("local_experts")
        out = {}
        for j in range(self.num_local_experts if slots is not None else 0):
            local = f"{prefix}local_experts.{j}."
            entries = {}
            for name, module in slots[j].named_children():
                if hasattr(module, "sharded_state_dict"):
                    entries.update(module.sharded_state_dict(f"{local}{name}.", layout.expert_offsets(j), metadata))
            replace_prefix_for_sharding(entries, local, f"{prefix}experts.")
            for entry in entries.values():
                entry.replica_id = (*entry.replica_id[:2], layout.edp_rank)
            out.update(entries)
        return out


class _ExpertLayout:
    """Where this rank's stacked expert weights sit in the global (layer..., expert, rows, columns) tensors."""

    def __init__(self, module: TorchGroupedMLP, sharded_offsets: tuple):
        self.n = module.num_local_experts
        self.first = module.ep_group.rank() * self.n
        self.total = module.ep_group.size() * self.n
        self.etp, self.etp_rank = module.tp_group.size(), module.tp_group.rank()
        self.edp_rank = module.dp_group.rank()
        self.sharded_offsets = tuple(sharded_offsets)
        self.axis = len(self.sharded_offsets)  # the expert axis; the matrix axes follow it
        self.replica_id = (0, 0, self.edp_rank)

    def expert_offsets(self, j: int) -> tuple:
        return (*self.sharded_offsets, (self.axis, self.first + j, self.total))

    @torch.no_grad()
    def build(self, key, data, replica_id, flattened_range, split: str):
        from megatron.core.dist_checkpointing import ShardedTensor

        if flattened_range is not None:
            raise NotImplementedError("grouped-GEMM experts do not support flattened (fully_sharded_model_space) "
                                      "optimizer states; use dp_reshardable or the non-distributed optimizer")
        rows = self.axis + 1
        out = []
        for j in range(self.n):
            def shard(t, *tp_offset):
                return ShardedTensor.from_rank_offsets(key, t, *self.expert_offsets(j), tp_offset,
                                                       replica_id=replica_id, prepend_axis_num=rows)

            if split == "swiglu":  # rank r's [gate_r; up_r] are blocks r and ETP + r of the global [gate; up]
                gate, up = torch.chunk(data[j], 2, dim=0)
                out += [shard(gate, rows, self.etp_rank, 2 * self.etp),
                        shard(up, rows, self.etp + self.etp_rank, 2 * self.etp)]
            else:
                out.append(shard(data[j], rows + (split == "columns"), self.etp_rank, self.etp))
        return out

    @torch.no_grad()
    def merge(self, loaded: list, split: str) -> torch.Tensor:
        if split == "swiglu":
            return torch.stack([torch.cat(loaded[2 * j:2 * j + 2]) for j in range(self.n)])
        return torch.stack(loaded)
