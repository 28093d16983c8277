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
- refused with a clear error, as megatron refuses or cannot express them: context parallelism, packed
  (THD) sequences, attention bias, ``softmax_type`` other than vanilla.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron.core import tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import get_sliding_window_causal_mask, is_layer_window_attention
from megatron.core.utils import divide

# torch >= 2.5 broadcasts grouped k/v itself; older torch needs them expanded to one head per query head.
SDPA_HAS_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


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
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not support context parallelism (context_parallel_size "
                             f"{config.context_parallel_size}); use the Transformer Engine spec")
        if config.softmax_type != "vanilla":
            raise ValueError(f"SDPAttention supports softmax_type='vanilla' only, got {config.softmax_type!r}; "
                             "use attention_impl='dot_product'")
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type

        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        elif not hasattr(pg_collection, "tp"):
            raise ValueError("SDPAttention pg_collection must have a tp process group")
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp
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
        """query ``[sq, b, np, hn]``, key/value ``[sk, b, ng, hn]`` -> context ``[sq, b, np * hn]``."""
        if packed_seq_params is not None:
            raise ValueError("packed (THD) sequences are not supported by SDPAttention (nor by megatron's "
                             "DotProductAttention); use the Transformer Engine spec or pass a boolean mask")
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by SDPAttention")
        sq, b, heads, hn = query.shape
        sk, groups = key.size(0), key.size(2)

        mask = attention_mask
        is_causal = False
        if self.window_size is not None:
            mask = get_sliding_window_causal_mask(sq, sk, self.window_size)
        elif mask is None and self.attn_mask_type == AttnMaskType.causal and sq > 1:
            if sq != sk:
                raise ValueError(f"causal attention without a mask needs sq == sk, got sq={sq} sk={sk}")
            is_causal = True

        # [s, b, n, hn] -> [b, n, s, hn]: strided views, the kernels accept them.
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        rep = heads // groups
        gqa = False
        if rep > 1:
            # Causal: let the kernel broadcast groups (flash on GPU, fastest on CPU). With a mask, expand:
            # the GPU memory-efficient kernel (the one taking masks) does not broadcast groups. Head i uses
            # group i // rep in both cases, as megatron's repeat_interleave does.
            if is_causal and SDPA_HAS_GQA:
                gqa = True
            else:
                k, v = (t.repeat_interleave(rep, dim=1) for t in (k, v))

        full_rows = None
        if mask is not None:
            if mask.dtype != torch.bool:
                raise ValueError(f"attention_mask must be boolean (True = masked out), got {mask.dtype}")
            # Rows with every key masked: megatron's -10000 fill makes them uniform over all keys.
            full_rows = mask.all(dim=-1, keepdim=True)  # [b|1, 1|np, sq, 1]
            mask = ~mask | full_rows  # SDPA: True = attend

        dropout_p = self.dropout_p if self.training else 0.0
        kwargs = dict(attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=self.softmax_scale)
        if gqa:
            kwargs["enable_gqa"] = True
        if dropout_p > 0.0 and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                context = F.scaled_dot_product_attention(q, k, v, **kwargs)
        else:
            context = F.scaled_dot_product_attention(q, k, v, **kwargs)

        if full_rows is not None:
            # [b, np, 1, hn]; dropout on a uniform row is rare enough to leave out (pad queries only).
            context = torch.where(full_rows, v.mean(dim=2, keepdim=True), context)
        # [b, np, sq, hn] -> [sq, b, np * hn]
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)
