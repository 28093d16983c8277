"""Training throughput, side by side in one process: this project vs plain megatron-core vs HF transformers.

Three stacks train the same Llama-shaped model on the same token batches with the same optimizer
(Adam(W) with identical hyper-parameters and gradient clipping; megatron-core's optimizer *is*
``torch.optim.AdamW`` when neither Transformer Engine nor apex is installed) and the same precision
recipe (fp32 on CPU; on GPU bf16 compute with fp32 master weights):

  a  project   the model, DDP wrapper, optimizer and step exactly as ``megatron_patch.training`` builds
               them (``rope_impl=auto``: the fused RoPE kernel when the device has one);
  b  mcore     upstream megatron-core by hand: ``GPTModel`` with its default layer spec (TE when
               usable, else local) and its unfused RoPE, megatron DDP + optimizer, the pipeline schedule;
  c  hf        ``transformers.LlamaForCausalLM`` (sdpa attention) with ``torch.optim.AdamW``; on GPU
               fp32 weights under bf16 autocast, which is what HF's Trainer does with ``bf16=True``;
  project-lora (on request) the project's trainer with LoRA adapters (``--lora-rank 16 --lora-alpha 32`` on
               every linear) on a frozen base: beside ``project`` it shows what LoRA saves.

For the project's stacks the training state is printed too: bytes of parameters, gradient buffers and
optimizer state (Adam moments, fp32 main copies) as the trainer holds them after the steps.

A step is forward + backward + optimizer on one micro-batch; tokens/s = micro-batch tokens / median
step time after warm-up. On GPU, TFLOP/s and MFU use megatron's model-FLOPs count (the formula of
Megatron-LM's ``num_floating_point_operations`` for a dense GQA SwiGLU model) over the device's dense
bf16 peak. Prints a table and appends JSON lines to ``benchmarks/results/`` (or ``--out``).

  python benchmarks/bench_train.py                 # tiny model, seconds on CPU
  python benchmarks/bench_train.py --size 1b       # Llama-3.2-1B shape on a GPU
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from typing import Callable, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks import common  # noqa: E402
from megatron_patch.models.family import args_from_hf  # noqa: E402
from megatron_patch.models.flops import flops_per_token, num_params  # noqa: E402

# HF config fields per size; "seq"/"mbs" are the benchmark's batch shape, "model_type" the HF family.
_LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}
SIZES = {
    # Llama-3.1 layout shrunk to run a step in well under a second on one CPU core.
    "tiny": dict(model_type="llama", hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, intermediate_size=688, vocab_size=8192, tie_word_embeddings=False,
                 rope_theta=500000.0, seq=256, mbs=2),
    # Llama-3.2-1B exactly (tied embeddings, llama3 rope scaling).
    "1b": dict(model_type="llama", hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True,
               rope_theta=500000.0, rope_scaling=dict(_LLAMA31_ROPE, factor=32.0), seq=2048, mbs=2),
    # Llama-3.1-8B width and vocabulary with 8 of its 32 layers (2.8B params): one GPU, seq 4096.
    "8b-w8": dict(model_type="llama", hidden_size=4096, num_hidden_layers=8, num_attention_heads=32,
                  num_key_value_heads=8, intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False,
                  rope_theta=500000.0, rope_scaling=_LLAMA31_ROPE, seq=4096, mbs=1),
    # Qwen3-MoE shrunk for CPU: every layer MoE, q/k norm, renormalized top-k.
    "tiny-moe": dict(model_type="qwen3_moe", hidden_size=128, num_hidden_layers=4, num_attention_heads=8,
                     num_key_value_heads=2, head_dim=16, intermediate_size=256, moe_intermediate_size=64,
                     num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
                     mlp_only_layers=[], router_aux_loss_coef=0.001, vocab_size=4096, tie_word_embeddings=False,
                     rope_theta=1000000.0, seq=128, mbs=2),
    # Qwen3-30B-A3B width (128 experts, top-8, expert ffn 768) with 6 of its 48 layers.
    "moe": dict(model_type="qwen3_moe", hidden_size=2048, num_hidden_layers=6, num_attention_heads=32,
                num_key_value_heads=4, head_dim=128, intermediate_size=6144, moe_intermediate_size=768,
                num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
                mlp_only_layers=[], router_aux_loss_coef=0.001, vocab_size=151936, tie_word_embeddings=False,
                rope_theta=1000000.0, seq=4096, mbs=1),
}
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
# The project stack with one speed lever turned off (or swapped) each, by the trainer's own flags: each
# lever's worth is measured on the shape, not assumed. Run them with --schedule sequential (process-wide kernel
# choices - SwiGLU, RoPE, SDPA - follow the stack last built).
ABLATIONS = {
    "project-no-liger": ["--liger-kernels", "none"],  # megatron's SwiGLU and vocab-parallel cross entropy
    "project-mcore-ce": ["--liger-kernels", "swiglu", "--cross-entropy-loss-fusion"],  # megatron's fused CE
    "project-no-rope-fusion": ["--no-rope-fusion"],
    "project-cudnn": ["--attention-backend", "fused"],  # SDPA's cuDNN kernel first (auto: torch's order)
    "project-no-grouped-gemm": ["--no-moe-grouped-gemm"],  # MoE: megatron's SequentialMLP experts
}
VARIANTS = ("project", "mcore", "hf", "project-lora", *ABLATIONS)
DEFAULT_VARIANTS = ("project", "mcore", "hf")
LORA_FLAGS = ["--lora-rank", "16", "--lora-alpha", "32", "--lora-target-modules", "all"]
LR, BETAS, EPS, CLIP = 1e-4, (0.9, 0.95), 1e-8, 1.0
# Dense bf16 tensor-core peak per device (vendor datasheets, without sparsity).
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))


def hf_config_dict(size: str, max_pos: int) -> dict:
    fields = {k: v for k, v in SIZES[size].items() if k not in ("seq", "mbs")}
    moe = fields["model_type"] == "qwen3_moe"
    return dict(architectures=[_ARCHITECTURES[fields["model_type"]]], hidden_act="silu",
                rms_norm_eps=1e-6 if moe else 1e-5, max_position_embeddings=max_pos, attention_bias=False,
                **({} if moe else {"mlp_bias": False}), **fields)


def max_position(size: str, seq: int) -> int:
    return max(seq, 131072 if "rope_scaling" in SIZES[size] else 4096)


def peak_tflops(override: Optional[float]) -> Optional[float]:
    if override:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- the three stacks
# Each builder returns step(batch) -> loss tensor. batch = {tokens, labels, loss_mask, position_ids} [b, s].


def build_project(cfg_dir: str, seq: int, mbs: int, bf16: bool, extra: tuple = ()) -> Callable:
    """(a) exactly what ``python -m megatron_patch.pretrain`` builds and runs per iteration (``extra``: more
    trainer flags, the ablations)."""
    from megatron_patch import pretrain
    from megatron_patch.training.trainer import Trainer

    argv = ["--model-config", cfg_dir, "--mock-data", "--train-iters", "1000000", "--seq-length", str(seq),
            "--micro-batch-size", str(mbs), "--lr", str(LR), "--min-lr", str(LR), "--lr-decay-style", "constant",
            "--weight-decay", "0", "--clip-grad", str(CLIP), "--adam-beta1", str(BETAS[0]),
            "--adam-beta2", str(BETAS[1]), "--adam-eps", str(EPS)] + (["--bf16"] if bf16 else []) + list(extra)
    trainer = Trainer(pretrain.prepare(argv, world_size=1))

    def step(batch: dict) -> torch.Tensor:
        total, _, _ = trainer.step([batch])
        return total[0] / total[1]

    step.state_bytes = lambda: training_state_bytes(trainer)
    return step


def training_state_bytes(trainer) -> dict:
    """Bytes of a project trainer's parameters, gradient buffers (DDP's) and optimizer state (tensors of the
    optimizer's per-parameter state, plus fp32 main copies of bf16 parameters)."""
    from megatron_patch.training.state import optimizers

    def nbytes(tensors) -> int:
        return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))

    params = nbytes(p for m in trainer.models for p in m.parameters())
    grads = nbytes(b.grad_data for c in trainer.chunks for b in c.buffers + c.expert_parallel_buffers)
    opt = 0
    for o in optimizers(trainer.optimizer):
        opt += nbytes(t for s in o.optimizer.state.values() for t in s.values())
        opt += nbytes(p for g in getattr(o, "fp32_from_float16_groups", ()) for p in g)
    return {"params": params, "grads": grads, "optimizer": opt, "total": params + grads + opt}


def build_mcore(cfg: dict, seq: int, mbs: int, bf16: bool, padded_vocab: int) -> Callable:
    """(b) upstream megatron-core only, as a Megatron-LM user would assemble it; RoPE unfused."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (get_gpt_decoder_block_spec, get_gpt_layer_local_spec,
                                                          get_gpt_layer_with_transformer_engine_spec)
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.module import Float16Module
    from megatron.core.transformer.transformer_config import TransformerConfig

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if bf16 else torch.float32
    try:
        import transformer_engine  # noqa: F401

        te = cuda
    except Exception:
        te = False
    heads = cfg["num_attention_heads"]
    moe = "num_experts" in cfg
    # MoE as a Megatron-LM user would configure Qwen3-MoE: softmax top-k router with aux loss, no token
    # dropping, alltoall dispatcher; megatron's default experts for the spec (local: SequentialMLP).
    moe_fields = dict(num_moe_experts=cfg["num_experts"], moe_router_topk=cfg["num_experts_per_tok"],
                      moe_ffn_hidden_size=cfg["moe_intermediate_size"], moe_router_load_balancing_type="aux_loss",
                      moe_aux_loss_coeff=cfg["router_aux_loss_coef"], moe_token_dispatcher_type="alltoall",
                      moe_grouped_gemm=te, qk_layernorm=True) if moe else {}
    config = TransformerConfig(
        num_layers=cfg["num_hidden_layers"], hidden_size=cfg["hidden_size"], ffn_hidden_size=cfg["intermediate_size"],
        num_attention_heads=heads, num_query_groups=cfg["num_key_value_heads"],
        kv_channels=cfg.get("head_dim") or cfg["hidden_size"] // heads, layernorm_epsilon=cfg["rms_norm_eps"],
        normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, params_dtype=dtype, pipeline_dtype=dtype, bf16=bf16,
        # apply_rope_fusion=False: megatron's unfused RoPE, whatever (a) installed in its fused slot.
        use_cpu_initialization=not cuda, apply_rope_fusion=False,
        # Megatron-LM's defaults on GPU (the same flags the project sets); the fused softmax only when its
        # CUDA extension (built by apex) is importable, since megatron calls it without checking.
        bias_activation_fusion=cuda, bias_dropout_fusion=cuda,
        masked_softmax_fusion=cuda and importlib.util.find_spec("scaled_masked_softmax_cuda") is not None,
        **moe_fields,
    )
    if moe:
        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=te, normalization="RMSNorm")
    else:
        spec = (get_gpt_layer_with_transformer_engine_spec() if te
                else get_gpt_layer_local_spec(normalization="RMSNorm"))
    scaling = cfg.get("rope_scaling") or {}
    model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=padded_vocab,
                     max_sequence_length=cfg["max_position_embeddings"], position_embedding_type="rope",
                     rotary_base=cfg["rope_theta"], rope_scaling=bool(scaling),
                     rope_scaling_factor=scaling.get("factor", 8.0),
                     share_embeddings_and_output_weights=cfg["tie_word_embeddings"])
    model.to(torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu"))
    if bf16:
        model = Float16Module(config, model)
    model = DistributedDataParallel(config=config, module=model,
                                    ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=bf16))
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=LR, weight_decay=0.0, adam_beta1=BETAS[0], adam_beta2=BETAS[1],
                        adam_eps=EPS, clip_grad=CLIP, bf16=bf16, params_dtype=dtype), [model])
    config.no_sync_func = model.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    schedule = get_forward_backward_func()

    def forward_step(data_iterator, m):
        b = next(data_iterator)
        out = m(b["tokens"], b["position_ids"], None, labels=b["labels"])  # per-token loss [b, s]

        def loss_func(output):
            mask = b["loss_mask"].reshape(-1).float()
            loss = torch.sum(output.float().reshape(-1) * mask) / mask.sum()
            return loss, {"lm loss": loss.detach()}

        return out, loss_func

    def step(batch: dict) -> torch.Tensor:
        model.zero_grad_buffer()
        optimizer.zero_grad()
        out = schedule(forward_step_func=forward_step, data_iterator=iter([batch]), model=[model],
                       num_microbatches=1, seq_length=seq, micro_batch_size=mbs, forward_only=False)
        optimizer.step()
        return out[0]["lm loss"]

    return step


def build_hf(cfg: dict, bf16: bool) -> Callable:
    """(c) plain HF transformers: the family's ``*ForCausalLM`` (sdpa), torch AdamW, bf16 autocast on GPU; MoE
    models add their router's load-balancing loss as the other stacks do."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    hf_cfg = AutoConfig.for_model(cfg["model_type"], **{k: v for k, v in cfg.items()
                                                        if k not in ("architectures", "model_type")})
    moe = "num_experts" in cfg
    with torch.device(dev):  # initialize directly on the device (a 1B model is slow to init on CPU)
        model = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa", dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0)
    vocab = cfg["vocab_size"]

    def step(batch: dict) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(input_ids=batch["tokens"], position_ids=batch["position_ids"],
                        **({"output_router_logits": True} if moe else {}))
        logits = out.logits
        # HF's own causal-LM loss upcasts the logits the same way; labels here are already shifted.
        per_token = F.cross_entropy(logits.float().reshape(-1, vocab), batch["labels"].reshape(-1), reduction="none")
        mask = batch["loss_mask"].reshape(-1).float()
        loss = torch.sum(per_token * mask) / mask.sum()
        (loss + cfg["router_aux_loss_coef"] * out.aux_loss if moe else loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        return loss.detach()

    return step


# ----------------------------------------------------------------------------- measuring


def timed_step(step: Callable, batch: dict) -> tuple[float, float]:
    sync()
    t0 = time.perf_counter()
    loss = step(batch)
    sync()
    return time.perf_counter() - t0, float(loss)


def summarize(times: list[float], losses: list[float], warmup: int) -> dict:
    timed = times[warmup:]
    return {"step_s": statistics.median(timed), "step_times_s": timed, "loss_first": losses[0],
            "loss_last": losses[-1]}


def make_batches(vocab: int, seq: int, mbs: int, n: int, seed: int) -> list[dict]:
    from megatron_patch import runtime
    from megatron_patch.training.data import MockDataset, step_batches

    ds = MockDataset(vocab, seq, seed, n * mbs)
    return [step_batches(ds, i * mbs, mbs, 1, 0, 1, runtime.device())[0] for i in range(n)]


def run(size: str, variants: list[str], warmup: int, iters: int, seq: Optional[int], mbs: Optional[int],
        dtype: str, peak_override: Optional[float], interleave: Optional[bool] = None) -> dict:
    from megatron_patch import runtime

    cuda = torch.cuda.is_available()
    bf16 = {"auto": cuda, "bf16": True, "fp32": False}[dtype]
    interleave = (not cuda) if interleave is None else interleave
    seq = seq or SIZES[size]["seq"]
    mbs = mbs or SIZES[size]["mbs"]
    cfg = hf_config_dict(size, max_pos=max_position(size, seq))
    padded = -(-cfg["vocab_size"] // 128) * 128
    margs = args_from_hf(cfg)
    fpt = flops_per_token(margs, seq, padded)
    peak = peak_tflops(peak_override)
    runtime.initialize(seed=1234)
    batches = make_batches(cfg["vocab_size"], seq, mbs, warmup + iters, seed=7)
    results = {}
    try:
        with tempfile.TemporaryDirectory() as cfg_dir:
            with open(os.path.join(cfg_dir, "config.json"), "w") as f:
                json.dump(cfg, f)
            builders = {"project": lambda: build_project(cfg_dir, seq, mbs, bf16),
                        "project-lora": lambda: build_project(cfg_dir, seq, mbs, bf16, tuple(LORA_FLAGS)),
                        "mcore": lambda: build_mcore(cfg, seq, mbs, bf16, padded),
                        "hf": lambda: build_hf(cfg, bf16)}
            builders.update({name: (lambda flags=flags: build_project(cfg_dir, seq, mbs, bf16, tuple(flags)))
                             for name, flags in ABLATIONS.items()})
            if interleave:
                # All stacks built at once, steps taken round-robin: load on a shared machine hits each alike.
                steps = {}
                for name in variants:
                    torch.manual_seed(1234)
                    steps[name] = builders[name]()
                log = {name: ([], []) for name in variants}
                for i, batch in enumerate(batches):
                    # Rotate who goes first each round: the first step after another stack's is slower on CPU.
                    k = i % len(variants)
                    for name in variants[k:] + variants[:k]:
                        dt, loss = timed_step(steps[name], batch)
                        log[name][0].append(dt)
                        log[name][1].append(loss)
                results = {name: summarize(*log[name], warmup) for name in variants}
                for name in variants:
                    if hasattr(steps[name], "state_bytes"):
                        results[name]["state_bytes"] = steps[name].state_bytes()
            else:
                # One stack at a time (a 1B model's three copies and their optimizer states need not fit).
                # A stack that fails (out of memory, say) is recorded and the others still run.
                for name in variants:
                    torch.manual_seed(1234)
                    if cuda:
                        torch.cuda.reset_peak_memory_stats()
                    step = None
                    try:
                        step = builders[name]()
                        times, losses = zip(*(timed_step(step, b) for b in batches))
                        results[name] = summarize(list(times), list(losses), warmup)
                        if hasattr(step, "state_bytes"):
                            results[name]["state_bytes"] = step.state_bytes()
                    except Exception as e:  # noqa: BLE001 - reported in the table and the JSON line
                        results[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
                    del step
                    gc.collect()
                    if cuda:
                        results[name]["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
                        torch.cuda.empty_cache()
            for r in results.values():
                if "error" in r:
                    continue
                r["tokens_per_s"] = seq * mbs / r["step_s"]
                r["tflops"] = r["tokens_per_s"] * fpt / 1e12
                r["mfu"] = r["tflops"] / peak if peak else None
    finally:
        from megatron_patch.fusions import rope as fused_rope

        rope_backend = fused_rope.active()
        runtime.teardown()
    n_params = num_params(margs)
    return {"size": size, "seq": seq, "mbs": mbs, "precision": "bf16" if bf16 else "fp32", "config": cfg,
            "params": n_params, "flops_per_token": fpt, "peak_tflops": peak, "warmup": warmup, "iters": iters,
            "schedule": "interleaved" if interleave else "sequential",
            "project_rope_backend": rope_backend, "results": results}


def ratio(results: dict, a: str, b: str) -> Optional[float]:
    if "tokens_per_s" in results.get(a, {}) and "tokens_per_s" in results.get(b, {}):
        return results[a]["tokens_per_s"] / results[b]["tokens_per_s"]
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default=None,
                   help="model size (default: 1b on GPU, tiny on CPU)")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma list of {', '.join(VARIANTS)} (default: {','.join(DEFAULT_VARIANTS)})")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
    p.add_argument("--iters", type=int, default=5, help="timed steps per variant (median reported)")
    p.add_argument("--seq-length", type=int, default=None, help="tokens per sample (default: per size)")
    p.add_argument("--micro-batch-size", type=int, default=None, help="samples per step (default: per size)")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto", help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: from device name)")
    p.add_argument("--schedule", choices=["auto", "interleaved", "sequential"], default="auto",
                   help="interleaved: all stacks built at once, steps round-robin (auto on CPU, where load "
                        "from other processes drifts); sequential: one stack at a time (auto on GPU)")
    p.add_argument("--out", default=None, help="results directory (default: benchmarks/results)")
    p.add_argument("--write-config", metavar="DIR", default=None,
                   help="only write the size's HF config.json into DIR (for the trainer's --model-config) and exit")
    a = p.parse_args(argv)
    variants = list(dict.fromkeys(v for v in a.variants.split(",") if v))
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        p.error(f"unknown variant(s) {bad}; choose from {', '.join(VARIANTS)}")
    interleaved = a.schedule == "interleaved" or (a.schedule == "auto" and not torch.cuda.is_available())
    if interleaved and any(v in ABLATIONS for v in variants):
        p.error("the project-* ablations need --schedule sequential: the kernels they switch are process-wide, "
                "so built side by side every project stack would run the last one's")
    if a.warmup < 0 or a.iters < 1:
        p.error("--warmup must be >= 0 and --iters >= 1")
    warnings.filterwarnings("ignore")
    size = a.size or ("1b" if torch.cuda.is_available() else "tiny")
    if a.write_config:
        os.makedirs(a.write_config, exist_ok=True)
        seq = a.seq_length or SIZES[size]["seq"]
        with open(os.path.join(a.write_config, "config.json"), "w") as f:
            json.dump(hf_config_dict(size, max_pos=max_position(size, seq)), f, indent=1)
        print(os.path.join(a.write_config, "config.json"))
        return 0
    out = run(size, variants, a.warmup, a.iters, a.seq_length, a.micro_batch_size, a.dtype, a.peak_tflops,
              None if a.schedule == "auto" else a.schedule == "interleaved")
    report(out, a.out)
    failed = [name for name, r in out["results"].items() if "error" in r]
    for name in failed:
        print(f"error: stack {name} failed: {out['results'][name]['error']}", file=sys.stderr)
    return 1 if failed else 0


def report(out: dict, out_dir: Optional[str]) -> None:
    res = out["results"]
    rows = []
    for name in VARIANTS:
        if name not in res:
            continue
        r = res[name]
        if "error" in r:
            rows.append([name, "failed", "-", "-", "-", "-", "-", r["error"][:60]])
            continue
        spread = (max(r["step_times_s"]) - min(r["step_times_s"])) / r["step_s"]
        rows.append([name, f"{r['tokens_per_s']:,.0f}", f"{r['step_s'] * 1000:.1f}", f"{100 * spread:.0f}%",
                     f"{r['tflops']:.1f}" if torch.cuda.is_available() else "-",
                     f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-",
                     f"{r['peak_memory_gb']:.1f}" if "peak_memory_gb" in r else "-",
                     f"{r['loss_first']:.3f} -> {r['loss_last']:.3f}"])
    print(f"bench_train: size={out['size']} ({out['params'] / 1e6:.1f}M params) seq={out['seq']} "
          f"mbs={out['mbs']} {out['precision']} warmup={out['warmup']} timed={out['iters']} {out['schedule']} "
          f"project RoPE={out['project_rope_backend']}")
    headers = ["stack", "tokens/s", "step ms", "(max-min)/med", "TFLOP/s", "MFU", "peak GB", "loss"]
    print(common.format_table(headers, rows))
    ab, ac = ratio(res, "project", "mcore"), ratio(res, "project", "hf")
    print("ratios (tokens/s): project/mcore = " + (f"{ab:.3f}" if ab else "-")
          + ", project/hf = " + (f"{ac:.3f}" if ac else "-"))
    levers = {name: ratio(res, "project", name) for name in ABLATIONS if name in res}
    if levers:  # > 1: the lever the ablation turns off wins on this shape
        print("levers (project tokens/s over the stack without it): "
              + ", ".join(f"{name[len('project-'):]} {r:.3f}" if r else f"{name[len('project-'):]} -"
                          for name, r in levers.items()))
    for name in ("project", "project-lora"):
        s = res.get(name, {}).get("state_bytes")
        if s:
            print(f"training state of {name}: params {s['params'] / 2**20:.1f} MiB + grads {s['grads'] / 2**20:.1f} MiB "
                  f"+ optimizer {s['optimizer'] / 2**20:.1f} MiB = {s['total'] / 2**20:.1f} MiB")
    records = [dict(variant=name, size=out["size"], seq=out["seq"], mbs=out["mbs"], precision=out["precision"],
                    params=out["params"], flops_per_token=out["flops_per_token"], peak_tflops=out["peak_tflops"],
                    rope_backend=out["project_rope_backend"] if name == "project" else "torch", **r)
               for name, r in res.items()]
    records.append(dict(variant="summary", size=out["size"], ratio_project_over_mcore=ab,
                        ratio_project_over_hf=ac, precision=out["precision"],
                        **{f"ratio_project_over_{name}": r for name, r in levers.items()}))
    path = common.append_results("bench_train", records, out_dir)
    print(f"results appended to {path}")


if __name__ == "__main__":
    sys.exit(main())
