"""Forward-only logits through megatron-core's pipeline schedule, gathered over TP, on every rank.

Used by the parity tests, the converter's ``--verify`` and the quickstart's generation: it runs the
real schedule (so PP communication is exercised), gathers the vocab-parallel logits, strips the vocab
padding and broadcasts the result from the last pipeline stage to the whole pipeline group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def forward_logits(model_chunks, tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Logits ``[b, s, vocab_size]`` (fp32) for ``tokens`` ``[b, s]``; identical on every rank."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    chunks = model_chunks if isinstance(model_chunks, list) else [model_chunks]
    for m in chunks:
        m.eval()
    b, s = tokens.shape
    dev = next(chunks[0].parameters()).device
    tokens = tokens.to(dev)
    positions = torch.arange(s, device=dev).unsqueeze(0).expand(b, -1)

    def step(data_iterator, model):
        batch = next(data_iterator)
        out = model(batch, positions, attention_mask=None)
        return out, lambda x: (x.float().sum() * 0, {"logits": x})

    n = len(chunks)
    # The interleaved schedule needs at least PP micro-batches: there, run one sample per micro-batch.
    per_sample = n > 1
    if per_sample and b < ps.get_pipeline_model_parallel_world_size():
        raise ValueError(f"interleaved forward needs a batch of at least PP={ps.get_pipeline_model_parallel_world_size()} samples")
    micro = list(tokens.split(1)) if per_sample else [tokens]
    if per_sample:
        positions = positions[:1]
    with torch.no_grad():
        result = get_forward_backward_func()(
            forward_step_func=step,
            data_iterator=[iter(micro) for _ in range(n)] if n > 1 else iter(micro),
            model=chunks,
            num_microbatches=len(micro),
            seq_length=s,
            micro_batch_size=micro[0].shape[0],
            forward_only=True,
        )
    shape = (b, s, vocab_size)
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        logits = torch.cat([gather_from_tensor_model_parallel_region(r["logits"]) for r in result])
        logits = logits[..., :vocab_size].float().contiguous()
    else:
        logits = torch.empty(shape, dtype=torch.float32, device=dev)
    if ps.get_pipeline_model_parallel_world_size() > 1:
        src = ps.get_pipeline_model_parallel_last_rank()
        dist.broadcast(logits, src=src, group=ps.get_pipeline_model_parallel_group())
    return logits
