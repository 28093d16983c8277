"""A few training steps on upstream megatron-core parts, on CPU with gloo: PP=2 x DP=2, the 1F1B schedule,
DDP and the distributed optimizer. The loss must fall and all ranks must agree on it and on the weights.

This checks the CPU runtime under megatron-core's own training machinery; the project's trainer
(``megatron_patch.training``) has its own, fuller tests.
"""

import torch

from megatron_patch.parallel import ParallelLayout
from megatron_patch.runtime import spawn
from megatron_patch.testing.tiny_models import VOCAB


def _train_worker(model_dir: str, steps: int):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_patch import runtime
    from megatron_patch.checkpointing.sources import load_into_model, open_source
    from megatron_patch.models.builder import build_model, transformer_config
    from megatron_patch.models.family import args_from_hf, read_hf_config

    runtime.initialize(ParallelLayout(pp=2), seed=3)
    args = args_from_hf(read_hf_config(model_dir))
    cfg = transformer_config(args, ParallelLayout(pp=2))
    model = build_model(args, cfg, transformer_impl="local", rope_impl="torch")
    load_into_model(model, open_source(model_dir))
    ddp = DistributedDataParallel(cfg, DistributedDataParallelConfig(use_distributed_optimizer=True,
                                                                      overlap_grad_reduce=False), model)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=3e-3, use_distributed_optimizer=True,
                                                 clip_grad=1.0, bf16=False, fp16=False), [ddp])
    # A fixed batch per DP rank (different across DP ranks): the loss on it must fall.
    g = torch.Generator().manual_seed(100 + ps.get_data_parallel_rank())
    data = torch.randint(0, VOCAB, (4, 2, 17), generator=g)  # 4 micro-batches of [2, 16+1]
    pos = torch.arange(16).unsqueeze(0).expand(2, -1)

    def step(it, m):
        mb = next(it)
        out = m(mb[:, :-1], pos, attention_mask=None, labels=mb[:, 1:])
        return out, lambda loss: (loss.float().mean(), {"loss": loss.float().mean().detach()})

    losses, norms = [], []
    for _ in range(steps):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        res = get_forward_backward_func()(forward_step_func=step, data_iterator=iter(data), model=[ddp],
                                          num_microbatches=4, seq_length=16, micro_batch_size=2,
                                          forward_only=False)
        ok, grad_norm, _ = opt.step()
        assert ok
        loss = torch.tensor(0.0)
        if ps.is_pipeline_last_stage():
            loss = torch.stack([r["loss"] for r in res]).mean()
        # Average over DP and share from the last stage so every rank reports the same number.
        dist.all_reduce(loss, group=ps.get_pipeline_model_parallel_group())
        dist.all_reduce(loss, group=ps.get_data_parallel_group())
        losses.append(loss.item() / ps.get_data_parallel_world_size())
        norms.append(float(grad_norm))
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    return {"losses": losses, "norms": norms, "pp_rank": ps.get_pipeline_model_parallel_rank(),
            "weights": weights}


def test_pp2_dp2_distributed_optimizer_trains(tiny_models):
    res = spawn.run(_train_worker, 4, tiny_models["llama3.1"], 8)
    losses = [r["losses"] for r in res]
    print("\nlosses rank0:", [round(x, 4) for x in losses[0]])
    assert all(l == losses[0] for l in losses), "ranks disagree on the loss"
    assert all(r["norms"] == res[0]["norms"] for r in res), "ranks disagree on the grad norm"
    l0 = losses[0]
    assert all(b < a for a, b in zip(l0, l0[1:])), "loss did not fall at every step"
    assert l0[-1] < 0.9 * l0[0], "loss did not fall by 10%"
    # Data-parallel replicas of the same pipeline stage hold identical weights after the updates.
    by_stage = {}
    for r in res:
        by_stage.setdefault(r["pp_rank"], []).append(r["weights"])
    assert sorted(by_stage) == [0, 1]
    for ws in by_stage.values():
        assert len(ws) == 2 and torch.equal(ws[0], ws[1])
