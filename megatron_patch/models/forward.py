"""Forward-only logits through megatron-core's pipeline schedule, gathered over TP, on every rank.

Used by the parity tests, the converter's ``--verify`` and the quickstart's generation: it runs the
real schedule (so PP communication is exercised), gathers the vocab-parallel logits (and the context-parallel
parts of the sequence), strips the vocab padding and broadcasts the result from the last pipeline stage to
the whole pipeline group.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_patch.models.context_parallel import split_for_cp, unsplit_sequence


def forward_logits(model_chunks, tokens: torch.Tensor, vocab_size: int,
                   attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Logits ``[b, s, vocab_size]`` (fp32) for ``tokens`` ``[b, s]``; identical on every rank.

    ``attention_mask`` (``[b|1, 1, s, s]``, True = masked out) replaces the causal default. Under context
    parallelism each CP rank runs its part of the sequence (``split_for_cp``) and the logits are gathered
    back into sequence order.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    chunks = model_chunks if isinstance(model_chunks, list) else [model_chunks]
    for m in chunks:
        m.eval()
    b, s = tokens.shape
    dev = next(chunks[0].parameters()).device
    cp, cp_rank = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
    batch = {"tokens": tokens.to(dev), "position_ids": torch.arange(s, device=dev).unsqueeze(0).expand(b, -1),
             "attention_mask": None if attention_mask is None else attention_mask.to(dev)}
    batch = split_for_cp(batch, cp, cp_rank)

    def step(data_iterator, model):
        mb = next(data_iterator)
        out = model(mb["tokens"], mb["position_ids"], attention_mask=mb["attention_mask"])
        return out, lambda x: (x.float().sum() * 0, {"logits": x})

    n = len(chunks)
    # The interleaved schedule needs at least PP micro-batches: there, run one sample per micro-batch.
    per_sample = n > 1
    if per_sample and b < ps.get_pipeline_model_parallel_world_size():
        raise ValueError(f"interleaved forward needs a batch of at least PP={ps.get_pipeline_model_parallel_world_size()} samples")
    if per_sample:
        mask = batch["attention_mask"]
        micro = [{"tokens": t, "position_ids": batch["position_ids"][:1],
                  "attention_mask": None if mask is None else mask[i:i + 1] if mask.size(0) > 1 else mask}
                 for i, t in enumerate(batch["tokens"].split(1))]
    else:
        micro = [batch]
    with torch.no_grad():
        result = get_forward_backward_func()(
            forward_step_func=step,
            data_iterator=[iter(micro) for _ in range(n)] if n > 1 else iter(micro),
            model=chunks,
            num_microbatches=len(micro),
            seq_length=s,
            micro_batch_size=micro[0]["tokens"].shape[0],
            forward_only=True,
        )
    shape = (b, s, vocab_size)
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        logits = torch.cat([gather_from_tensor_model_parallel_region(r["logits"]) for r in result])
        logits = logits[..., :vocab_size].float().contiguous()
        if cp > 1:
            parts = [torch.empty_like(logits) for _ in range(cp)]
            dist.all_gather(parts, logits, group=ps.get_context_parallel_group())
            logits = unsplit_sequence(parts, dim=1).contiguous()
    else:
        logits = torch.empty(shape, dtype=torch.float32, device=dev)
    if ps.get_pipeline_model_parallel_world_size() > 1:
        src = ps.get_pipeline_model_parallel_last_rank()
        dist.broadcast(logits, src=src, group=ps.get_pipeline_model_parallel_group())
    return logits
