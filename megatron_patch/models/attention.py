"""Core attention on torch ``scaled_dot_product_attention`` for megatron-core's local layer spec.

A drop-in for ``megatron.core.transformer.dot_product_attention.DotProductAttention`` (same constructor,
same ``forward`` signature, same output, no parameters, so checkpoints are interchangeable) that lets
torch pick a fused kernel (flash / memory-efficient on GPU, the flash-style CPU kernel on CPU) instead of
materializing the ``[b, np, sq, sk]`` score matrix through two ``bmm``s and a separate softmax.

Behaviour follows megatron's ``DotProductAttention`` + ``FusedScaleMaskSoftmax`` (torch path):
- ``attention_mask`` None: causal (sq == sk) when the layer's ``attn_mask_type`` is causal, no mask for a
  single query (sq == 1) or a non-causal type; a given boolean mask (True = masked out, ``[b|1, 1, sq, sk]``)
  is used as is. As in megatron, ``forward``'s ``attn_mask_type`` argument is ignored: the layer's own type
  from the spec decides. A sliding window (``config.window_size``) replaces any mask, as megatron does.
- megatron fills masked scores with -10000 rather than -inf, so a query row with *every* key masked gets
  the uniform average of the values (torch's kernels would give zeros): reproduced exactly.
- ``apply_query_key_layer_scaling`` divides the scale by the layer number and multiplies it back inside an
  fp32 softmax: the net scale is unchanged, and the fused kernels always accumulate the softmax in fp32, so
  it (and ``attention_softmax_in_fp32``) are honoured by construction.
- attention dropout runs inside megatron's RNG tracker fork (skipped under sequence parallelism, as upstream).
- refused with a clear error, as megatron refuses or cannot express them: packed (THD) sequences,
  attention bias, ``softmax_type`` other than vanilla.

Context parallelism (megatron's DotProductAttention refuses it; this one serves it, on any device and
over gloo): each CP rank holds chunks r and 2N-1-r of the sequence (``models/context_parallel.py``).
K and V are all-gathered in the CP group (one collective for both; the backward reduce-scatters their
gradients) and put back in sequence order; the rank's queries then attend to them:
- causal, no mask: each query chunk j attends only to the keys before its end, ``[0, (j+1) c)``, with a
  lower-right causal mask (its own chunk causally, earlier ones fully), so the pairing of early and late
  chunks gives every rank the same work;
- an explicit mask arrives split on its query dim (``split_for_cp``: ``[b|1, 1, s/N, s]``, keys global) and
  is used as is over all keys, so any mask (packed documents, padding) means what it means at CP 1;
- a sliding window is rebuilt from the tokens' global positions.
``cp_comm_type`` (Transformer Engine's choice of p2p / a2a / all_gather) does not apply here: this
implementation always all-gathers K/V.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.bias import CausalBias, causal_lower_right

from megatron.core import tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import get_sliding_window_causal_mask, is_layer_window_attention
from megatron.core.utils import divide

from megatron_patch.models import context_parallel as cp_split

# torch >= 2.5 broadcasts grouped k/v itself; older torch needs them expanded to one head per query head.
SDPA_HAS_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")

# Which fused kernel SDPA tries first on CUDA, by Megatron-LM's ``--attention-backend`` names: ``fused`` is
# cuDNN's fused attention (what TE's "fused" backend is; on Hopper ~2x flash's forward in torch's own data),
# ``flash`` torch's FlashAttention-2, ``unfused`` the math kernel, ``auto`` torch's own order. Kernels that cannot
# take a call (a mask, grouped K/V, a head size) are skipped in order, so every choice serves every call.
SDPA_BACKENDS = ("auto", "fused", "flash", "unfused")
_SDPA_ORDER: list = [None]


def set_sdpa_backend(name: str = "auto") -> None:
    """Process-wide preference for SDPA's CUDA kernels (``SDPA_BACKENDS``)."""
    from torch.nn.attention import SDPBackend

    if name not in SDPA_BACKENDS:
        raise ValueError(f"attention backend must be one of {SDPA_BACKENDS}, got {name!r}")
    first = {"fused": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
             "unfused": SDPBackend.MATH}.get(name)
    rest = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    _SDPA_ORDER[0] = None if first is None else [first] + [b for b in rest if b != first]


class SDPAttention(MegatronModule):
    """``DotProductAttention`` computed by ``torch.nn.functional.scaled_dot_product_attention``."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ):
        super().__init__(config=config)
        self.config: TransformerConfig = config
        if config.softmax_type != "vanilla":
            raise ValueError(f"SDPAttention supports softmax_type='vanilla' only, got {config.softmax_type!r}; "
                             "use attention_impl='dot_product'")
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type

        cp = config.context_parallel_size
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"] + (["cp"] if cp > 1
                                                                                                else []))
        elif not hasattr(pg_collection, "tp"):
            raise ValueError("SDPAttention pg_collection must have a tp process group")
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp
        self.cp_group = None
        if cp > 1:
            self.cp_group = getattr(pg_collection, "cp", None)
            if self.cp_group is None or self.cp_group.size() != cp:
                raise ValueError(f"SDPAttention needs a context parallel group of size {cp} (context_parallel_size)"
                                 "; initialize megatron's parallel state with it or pass pg_collection.cp")
        tp = pg_collection.tp.size()
        projection_size = config.kv_channels * config.num_attention_heads
        self.hidden_size_per_partition = divide(projection_size, tp)
        self.hidden_size_per_attention_head = divide(projection_size, config.num_attention_heads)
        self.num_attention_heads_per_partition = divide(config.num_attention_heads, tp)
        self.num_query_groups_per_partition = divide(config.num_query_groups, tp)
        # Megatron's query-key layer scaling divides here and multiplies back in the softmax: net 1.
        self.softmax_scale = (1.0 / math.sqrt(self.hidden_size_per_attention_head)
                              if softmax_scale is None else softmax_scale)
        self.window_size = (config.window_size if is_layer_window_attention(
            config.window_size, config.window_attn_skip_freq, layer_number) else None)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[Tensor] = None,
        packed_seq_params=None,
    ) -> Tensor:
        """query ``[sq, b, np, hn]``, key/value ``[sk, b, ng, hn]`` -> context ``[sq, b, np * hn]``.

        Under context parallelism all three hold this rank's two chunks (``sq == sk == s / CP``) and an
        explicit mask its query rows against all ``s`` keys.
        """
        if packed_seq_params is not None:
            raise ValueError("packed (THD) sequences are not supported by SDPAttention (nor by megatron's "
                             "DotProductAttention); use the Transformer Engine spec or pass a boolean mask")
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by SDPAttention")
        if attention_mask is not None and attention_mask.dtype != torch.bool:
            raise ValueError(f"attention_mask must be boolean (True = masked out), got {attention_mask.dtype}")
        sq, b = query.shape[:2]
        # [s, b, n, hn] -> [b, n, s, hn]: strided views, the kernels accept them.
        q = query.permute(1, 2, 0, 3)
        if self.dropout_p > 0.0 and self.training and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                context = self._attention(q, key, value, attention_mask)
        else:
            context = self._attention(q, key, value, attention_mask)
        # [b, np, sq, hn] -> [sq, b, np * hn]
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)

    def _attention(self, q: Tensor, key: Tensor, value: Tensor, mask: Optional[Tensor]) -> Tensor:
        """q ``[b, np, sq, hn]``, key/value ``[sk, b, ng, hn]`` (local) -> ``[b, np, sq, hn]``."""
        causal = self.attn_mask_type == AttnMaskType.causal
        if self.cp_group is not None:
            return self._cp_attention(q, key, value, mask, causal)
        sq, sk = q.size(2), key.size(0)
        k, v = (t.permute(1, 2, 0, 3) for t in (key, value))
        if self.window_size is not None:
            return self._sdpa(q, k, v, mask=get_sliding_window_causal_mask(sq, sk, self.window_size))
        if mask is None and causal and sq > 1:
            if sq != sk:
                raise ValueError(f"causal attention without a mask needs sq == sk, got sq={sq} sk={sk}")
            return self._sdpa(q, k, v, causal=True)
        return self._sdpa(q, k, v, mask=mask)

    def _cp_attention(self, q: Tensor, key: Tensor, value: Tensor, mask: Optional[Tensor], causal: bool) -> Tensor:
        """This CP rank's queries (chunks r, 2N-1-r) against the whole sequence's keys (see the module doc)."""
        n, rank = self.cp_group.size(), self.cp_group.rank()
        sq = q.size(2)
        if key.size(0) != sq:
            raise ValueError(f"context-parallel attention needs this rank's queries and keys to be the same "
                             f"chunks, got sq={sq} sk={key.size(0)}")
        # One collective for K and V: [s/N, b, 2, ng, hn] -> [s, b, 2, ng, hn] in sequence order.
        kv = cp_split.gather_sequence(torch.stack((key, value), dim=2), self.cp_group)
        k, v = (kv[:, :, i].permute(1, 2, 0, 3) for i in range(2))  # [b, ng, s, hn]
        s = k.size(2)
        if self.window_size is not None:
            dev = q.device
            q_pos = cp_split.local_positions(s, n, rank, device=dev)
            window = cp_split.sliding_window_mask(q_pos, torch.arange(s, device=dev), self.window_size)
            return self._sdpa(q, k, v, mask=window)
        if mask is not None:
            if mask.size(-2) != sq or mask.size(-1) != s:
                raise ValueError(f"under context parallelism the attention mask must be this rank's query rows "
                                 f"against all keys, [..., {sq}, {s}] (split_for_cp), got {tuple(mask.shape)}")
            return self._sdpa(q, k, v, mask=mask)
        if not causal:
            return self._sdpa(q, k, v)
        # Causal: each query chunk sees the keys up to its own end, its own chunk lower-right causal.
        c = sq // 2
        outs = []
        for i, keys in enumerate(cp_split.causal_key_prefixes(n, rank, c)):
            qi = q[:, :, i * c:(i + 1) * c]
            outs.append(self._sdpa(qi, k[:, :, :keys], v[:, :, :keys], causal=causal_lower_right(c, keys)))
        return torch.cat(outs, dim=2)

    def _sdpa(self, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None,
              causal: Union[bool, CausalBias] = False) -> Tensor:
        """One SDPA call: q ``[b, np, sq, hn]``, k/v ``[b, ng, sk, hn]``; ``mask`` boolean (True = masked out),
        or ``causal`` (True: upper-left, sq == sk; a ``CausalBias``: lower-right over a key prefix)."""
        kwargs = dict(dropout_p=self.dropout_p if self.training else 0.0, scale=self.softmax_scale)
        rep = q.size(1) // k.size(1)
        if rep > 1:
            # Causal: let the kernel broadcast groups (flash on GPU, fastest on CPU). With a mask, expand:
            # the GPU memory-efficient kernel (the one taking masks) does not broadcast groups. Head i uses
            # group i // rep in both cases, as megatron's repeat_interleave does.
            if causal is not False and SDPA_HAS_GQA and _broadcasts_groups(q, k, v, kwargs["dropout_p"], causal):
                kwargs["enable_gqa"] = True
            else:
                k, v = (t.repeat_interleave(rep, dim=1) for t in (k, v))
        full_rows = None
        if mask is not None:
            # Rows with every key masked: megatron's -10000 fill makes them uniform over all keys.
            full_rows = mask.all(dim=-1, keepdim=True)  # [b|1, 1|np, sq, 1]
            kwargs["attn_mask"] = ~mask | full_rows  # SDPA: True = attend
        elif isinstance(causal, CausalBias):
            kwargs["attn_mask"] = causal
        else:
            kwargs["is_causal"] = bool(causal)
        if _SDPA_ORDER[0] is not None and q.is_cuda:
            from torch.nn.attention import sdpa_kernel

            with sdpa_kernel(_SDPA_ORDER[0], set_priority=True):
                context = F.scaled_dot_product_attention(q, k, v, **kwargs)
        else:
            context = F.scaled_dot_product_attention(q, k, v, **kwargs)
        if full_rows is not None:
            # [b, np, 1, hn]; dropout on a uniform row is rare enough to leave out (pad queries only).
            context = torch.where(full_rows, v.mean(dim=2, keepdim=True), context)
        return context


def _broadcasts_groups(q: Tensor, k: Tensor, v: Tensor, dropout_p: float, causal: Union[bool, CausalBias]) -> bool:
    """Whether the kernel serving this causal call may be given grouped K/V (``enable_gqa``).

    A lower-right ``CausalBias`` on CUDA runs flash (which broadcasts groups) or else the memory-efficient
    kernel with its own lower-right mask type, which does not: given grouped K/V there, torch would
    materialize an ``sq x sk`` mask for the math kernel, so K/V are expanded instead. On CPU both paths
    materialize the mask anyway, and broadcasting saves the expanded copy.
    """
    if not isinstance(causal, CausalBias) or q.device.type != "cuda":
        return True
    from torch.backends.cuda import SDPAParams, can_use_flash_attention

    return can_use_flash_attention(SDPAParams(q, k, v, None, dropout_p, False, True))
