"""Megatron-LM's flags in the trainer: translation into megatron-core's configs, architecture checks, GPU-only and
unsupported flags refused with one line, data and logging flags, and (one 2-process launch) overlapped
communication and resuming a checkpoint in Megatron-LM's exact format."""

import importlib.util
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from megatron_patch.runtime import spawn
from megatron_patch.training import megatron_lm_flags as F
from megatron_patch.training.arguments import (ArgumentError, check_architecture_flags, data_settings,
                                               logging_settings, parse_args)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ["--model-config", "x", "--mock-data", "--train-iters", "2"]


def args(*extra, world=1):
    return parse_args(BASE + list(extra), world_size=world)


def test_flags_to_transformer_ddp_and_optimizer_configs():
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.transformer.enums import AttnBackend

    a = args("--hidden-dropout", "0.1", "--attention-dropout", "0.05", "--init-method-std", "0.01",
             "--recompute-activations", "--use-distributed-optimizer", "--overlap-grad-reduce",
             "--overlap-param-gather")
    assert F.transformer_overrides(a) == {"hidden_dropout": 0.1, "attention_dropout": 0.05, "init_method_std": 0.01}
    assert a.recompute_granularity == "selective"
    ddp = DistributedDataParallelConfig(**F.ddp_overrides(a))
    assert ddp.overlap_grad_reduce and ddp.overlap_param_gather and ddp.align_param_gather
    assert OptimizerConfig(**F.optimizer_overrides(a)).overlap_param_gather
    assert F.ddp_overrides(args()) == {"overlap_grad_reduce": False, "overlap_param_gather": False,
                                       "align_param_gather": False}
    # Virtual stages: overlapped pipeline exchanges (Megatron-LM's default), batched with the flag.
    vpp = ["--pipeline-model-parallel-size", "4", "--num-layers-per-virtual-pipeline-stage", "1"]
    p2p = [(o["overlap_p2p_comm"], o["batch_p2p_comm"]) for o in
           (F.transformer_overrides(args(*vpp, world=4)),
            F.transformer_overrides(args(*vpp, "--no-overlap-p2p-communication", world=4)))]
    assert p2p == [(True, False), (False, True)]
    # The trainer's TransformerConfig carries them.
    from megatron_patch.models.family import args_from_hf
    from megatron_patch.testing.tiny_models import hf_config
    from megatron_patch.training.arguments import run_config
    from megatron_patch.training.trainer import transformer_config

    margs = args_from_hf(hf_config("llama3.1").to_dict())
    cfg = transformer_config(run_config(a, margs))
    assert (cfg.hidden_dropout, cfg.attention_dropout, cfg.init_method_std, cfg.recompute_granularity) == \
        (0.1, 0.05, 0.01, "selective")
    # GPU-only flags: translated for megatron-core on a GPU, refused on CPU.
    from megatron_patch.training.arguments import build_parser

    g = build_parser().parse_args(BASE + ["--fp8-format", "hybrid", "--fp8-recipe", "mxfp8", "--tp-comm-overlap",
                                          "--sequence-parallel", "--attention-backend", "flash", "--enable-cuda-graph",
                                          "--cross-entropy-loss-fusion", "--cross-entropy-fusion-impl", "te"])
    assert F.validate(g, on_gpu=True) is None
    assert F.transformer_overrides(g) == {
        "hidden_dropout": 0.0, "attention_dropout": 0.0, "fp8": "hybrid", "fp8_recipe": "mxfp8",
        "tp_comm_overlap": True, "attention_backend": AttnBackend.flash, "cuda_graph_impl": "local",
        "cross_entropy_loss_fusion": True, "cross_entropy_fusion_impl": "te"}
    assert "--fp8-format, --fp8-recipe, --tp-comm-overlap, --attention-backend, --enable-cuda-graph" in \
        F.validate(g, on_gpu=False)


@pytest.mark.parametrize("extra,message", [
    (["--fp8-format", "e4m3"], "--fp8-format needs a CUDA GPU"),
    (["--cuda-graph-impl", "local"], "--cuda-graph-impl needs a CUDA GPU"),
    (["--use-legacy-models"], "--use-legacy-models (a Megatron-LM flag) is not supported"),
    (["--yaml-cfg", "a.yaml"], "--yaml-cfg (a Megatron-LM flag)"),
    (["--dataloader-type", "external"], "user-supplied data iterator"),
    (["--overlap-param-gather"], "needs --use-distributed-optimizer and --overlap-grad-reduce"),
    (["--recompute-activations", "--recompute-granularity", "full"], "contradicts"),
    (["--hidden-dropout", "1.5"], "--hidden-dropout must lie in [0, 1)"),
    (["--wandb-project", "p"], "wandb"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    # Megatron-LM flags of its own run scripts: GPU-only ones refused on CPU, contradictions named.
    (["--fp8-amax-history-len", "16"], "--fp8-amax-history-len needs a CUDA GPU"),
    (["--fp8-amax-compute-algo", "max"], "--fp8-amax-compute-algo needs a CUDA GPU"),
    (["--external-cuda-graph"], "--external-cuda-graph needs a CUDA GPU"),
    (["--cuda-graph-scope", "attn"], "--cuda-graph-scope needs a CUDA GPU"),
    (["--te-rng-tracker"], "--te-rng-tracker needs a CUDA GPU"),
    (["--cpu-offloading"], "--cpu-offloading needs a CUDA GPU"),
    (["--cpu-offloading-num-layers", "1"], "--cpu-offloading-num-layers needs a CUDA GPU"),
    (["--optimizer-cpu-offload"], "--optimizer-cpu-offload needs a CUDA GPU"),
    (["--optimizer-offload-fraction", "0.5"], "--optimizer-offload-fraction needs a CUDA GPU"),
    (["--use-precision-aware-optimizer"], "--use-precision-aware-optimizer needs a CUDA GPU"),
    (["--optimizer", "sgd", "--use-distributed-optimizer"], "distributed optimizer shards Adam only"),
    (["--optimizer", "lamb"], "invalid choice: 'lamb'"),
    (["--no-rope-fusion", "--rope-impl", "triton"], "contradicts --rope-impl triton"),
    (["--no-create-attention-mask-in-dataloader", "--reset-attention-mask"], "contradicts --reset-attention-mask"),
    (["--padded-vocab-size", "0"], "--padded-vocab-size must be >= 1"),
])
def test_refused_flags(extra, message):
    if extra[0] == "--wandb-project" and importlib.util.find_spec("wandb"):
        pytest.skip("wandb is installed here")
    with pytest.raises(ArgumentError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        args(*extra)


def test_refusal_is_one_error_line():
    r = subprocess.run([sys.executable, "-m", "megatron_patch.pretrain"] + BASE + ["--fp8-format", "e4m3"], cwd=ROOT,
                       env=dict(os.environ, PYTHONWARNINGS="ignore"), capture_output=True, text=True)
    lines = [x for x in r.stderr.strip().splitlines() if x.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: --fp8-format"), r.stderr


def test_architecture_flags_must_agree_with_the_model():
    from megatron_patch.models.family import args_from_hf
    from megatron_patch.testing.tiny_models import hf_config

    margs = args_from_hf(hf_config("qwen3").to_dict())  # 4 layers, 8 heads / 2 groups, head_dim 16, qk-norm
    ok = args("--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "8", "--group-query-attention",
              "--num-query-groups", "2", "--kv-channels", "16", "--qk-layernorm", "--norm-epsilon", "1e-6",
              "--swiglu", "--normalization", "RMSNorm", "--disable-bias-linear", "--position-embedding-type", "rope",
              "--rotary-base", "1000000", "--untie-embeddings-and-output-weights", "--ffn-hidden-size", "96",
              "--max-position-embeddings", "256", "--use-rotary-position-embeddings")
    check_architecture_flags(ok, margs)
    bad = args("--num-layers", "2", "--kv-channels", "8", "--norm-epsilon", "1e-5", "--add-qkv-bias",
               "--group-query-attention", "--normalization", "LayerNorm", "--use-rope-scaling")
    with pytest.raises(ArgumentError) as e:
        check_architecture_flags(bad, margs)
    msg = str(e.value)
    for part in ("--num-layers 2 (model: 4)", "--kv-channels 8 (model: 16)", "--norm-epsilon 1e-05 (model: 1e-06)",
                 "--add-qkv-bias True (model: False)", "mean 1 query groups (model: 2)",
                 "--normalization LayerNorm (model: RMSNorm)", "--use-rope-scaling True (model: False)"):
        assert part in msg, msg


def test_megatron_lm_run_script_flags_take_effect():
    """The flags Megatron-LM's own run scripts pass: accepted with their effect where this trainer has it."""
    from megatron_patch.models.family import args_from_hf
    from megatron_patch.testing.tiny_models import hf_config
    from megatron_patch.training.arguments import run_config
    from megatron_patch.training.trainer import transformer_config

    margs = args_from_hf(hf_config("llama3.1").to_dict())  # 4 layers, vocab 250
    a = args("--no-bias-swiglu-fusion", "--apply-query-key-layer-scaling", "--no-rope-fusion", "--optimizer", "sgd",
             "--sgd-momentum", "0.5", "--padded-vocab-size", "256", "--make-vocab-size-divisible-by", "128",
             "--rotary-percent", "1.0", "--no-create-attention-mask-in-dataloader", "--log-batch-size-to-tensorboard",
             "--pipeline-model-parallel-size", "2", "--decoder-first-pipeline-num-layers", "3", world=2)
    assert a.rope_impl == "torch"  # --no-rope-fusion
    config = run_config(a, margs)
    assert (config.optimizer.optimizer, config.optimizer.sgd_momentum) == ("sgd", 0.5)
    assert config.logging.log_batch_size_to_tensorboard and config.build.rope_impl == "torch"
    assert (config.layout.first_stage_layers, config.layout.stage_sizes(margs.num_layers)) == (3, [3, 1])
    tc = transformer_config(config)
    assert tc.bias_activation_fusion is False and tc.apply_query_key_layer_scaling and tc.attention_softmax_in_fp32
    assert (tc.num_layers_in_first_pipeline_stage, tc.num_layers_in_last_pipeline_stage) == (3, None)
    # The padded vocab must be what the padding gives; a partial rotary dimension is another architecture.
    with pytest.raises(ArgumentError, match=r"--padded-vocab-size 256 is not .* \(100\) x TP \(1\), which is 300"):
        run_config(args("--padded-vocab-size", "256", "--make-vocab-size-divisible-by", "100"), margs)
    with pytest.raises(ArgumentError, match=r"--rotary-percent 0.5 \(model: 1.0\).*rotates the whole head dimension"):
        run_config(args("--rotary-percent", "0.5"), margs)
    # Uneven stages follow the one pipeline rule (the converter's too).
    with pytest.raises(ArgumentError, match="cannot be combined with virtual pipeline stages"):
        run_config(args("--pipeline-model-parallel-size", "2", "--decoder-first-pipeline-num-layers", "3",
                        "--num-layers-per-virtual-pipeline-stage", "1", world=2), margs)
    with pytest.raises(ArgumentError, match="does not fit 4 layers in 2 stages"):
        run_config(args("--pipeline-model-parallel-size", "2", "--decoder-first-pipeline-num-layers", "3",
                        "--decoder-last-pipeline-num-layers", "2", world=2), margs)


def test_gpu_only_run_script_flags_translate_on_a_gpu():
    """Translated into megatron-core's configs on a GPU (as the other GPU-only flags); what megatron-core serves
    only with Transformer Engine is refused without it, naming it (this machine has neither GPU nor TE)."""
    from megatron.core.optimizer import OptimizerConfig

    from megatron_patch.training.arguments import build_parser

    def parsed(*extra):
        return build_parser().parse_args(BASE + list(extra))

    g = parsed("--fp8-format", "e4m3", "--fp8-amax-history-len", "16", "--fp8-amax-compute-algo", "max",
               "--external-cuda-graph", "--cuda-graph-scope", "attn", "mlp")
    assert F.validate(g, on_gpu=True) is None
    over = F.transformer_overrides(g)
    assert {k: over[k] for k in ("fp8_amax_history_len", "fp8_amax_compute_algo", "cuda_graph_impl",
                                 "cuda_graph_scope")} == {"fp8_amax_history_len": 16, "fp8_amax_compute_algo": "max",
                                                          "cuda_graph_impl": "transformer_engine",
                                                          "cuda_graph_scope": ["attn", "mlp"]}
    assert "need --fp8-format" in F.validate(parsed("--fp8-amax-history-len", "16"), on_gpu=True)
    assert "needs CUDA graphs" in F.validate(parsed("--cuda-graph-scope", "attn"), on_gpu=True)
    assert "give one of them" in F.validate(parsed("--external-cuda-graph", "--enable-cuda-graph"), on_gpu=True)
    te = parsed("--te-rng-tracker", "--cpu-offloading-num-layers", "2")
    assert F.transformer_overrides(te)["use_te_rng_tracker"] and {
        k: F.transformer_overrides(te)[k] for k in ("cpu_offloading", "cpu_offloading_num_layers")} == {
        "cpu_offloading": True, "cpu_offloading_num_layers": 2}
    assert "--cpu-offloading needs Transformer Engine" in F.validate(te, on_gpu=True)
    assert "--te-rng-tracker needs Transformer Engine" in F.validate(parsed("--te-rng-tracker"), on_gpu=True)
    # Optimizer CPU offload: Megatron-LM's rules, then whatever the installed megatron-core can build.
    assert "needs --use-precision-aware-optimizer" in F.validate(parsed("--optimizer-cpu-offload"), on_gpu=True)
    assert "needs --optimizer-cpu-offload" in F.validate(parsed("--optimizer-offload-fraction", "0.5"), on_gpu=True)
    assert "needs --use-distributed-optimizer" in F.validate(parsed("--use-precision-aware-optimizer"), on_gpu=True)
    offload = parsed("--optimizer-cpu-offload", "--optimizer-offload-fraction", "0.5",
                     "--use-precision-aware-optimizer", "--use-distributed-optimizer")
    kw = F.optimizer_overrides(offload)
    assert kw == {"overlap_param_gather": False, "use_precision_aware_optimizer": True, "optimizer_cpu_offload": True,
                  "optimizer_offload_fraction": 0.5}
    for flags in (offload, parsed("--use-precision-aware-optimizer", "--use-distributed-optimizer")):
        try:  # megatron-core 0.19 builds the offloading optimizer without TE; 0.16's version check needs TE
            OptimizerConfig(optimizer="adam", use_distributed_optimizer=True, **F.optimizer_overrides(flags))
            buildable = True
        except Exception:  # noqa: BLE001
            buildable = False
        problem = F.validate(flags, on_gpu=True)
        assert (problem is None) == buildable and (buildable or "cannot build this optimizer here" in problem), problem


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A tiny indexed dataset whose documents end in EOD, and its tokenizer."""
    from toolkits.data.preprocess import preprocess
    from toolkits.data.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("corpus")
    words = "the cat sat on a mat while dogs ran in the park".split()
    texts = [" ".join(words[i % 5:]) for i in range(40)]
    train_tokenizer(texts, str(d / "tok"), vocab_size=300)
    with open(d / "c.jsonl", "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    preprocess([str(d / "c.jsonl")], str(d / "c"), str(d / "tok"), progress=False)
    return {"prefix": str(d / "c"), "tok": str(d / "tok"), "cache": str(d / "cache")}


def test_data_flags_reach_gpt_dataset(corpus):
    from megatron_patch.training import data

    tok = data.DatasetTokenizer(data.load_tokenizer(corpus["tok"]))
    common = ["--tokenizer-model", corpus["tok"], "--seq-length", "32", "--data-cache-path", corpus["cache"]]
    a = parse_args(["--model-config", "x", "--train-iters", "2", "--train-data-path", corpus["prefix"],
                    "--valid-data-path", corpus["prefix"], "--eod-mask-loss", "--reset-position-ids",
                    "--reset-attention-mask"] + common, world_size=1)
    train, valid, _ = data.build_pretraining_datasets(data_settings(a), a.seq_length, a.seed, tok, [8, 4, 0])
    assert train is not None and valid is not None  # per-split paths, no --split
    s = train[0]
    eod = (s["tokens"] == tok.eod).nonzero().flatten()
    assert len(eod) > 0
    i = int(eod[0])
    assert s["loss_mask"][i] == 0  # --eod-mask-loss
    assert s["position_ids"][i + 1] == 0  # --reset-position-ids
    assert s["attention_mask"][0, i + 1, i]  # --reset-attention-mask: the next document cannot see this one
    plain = parse_args(["--model-config", "x", "--train-iters", "2", "--data-path", corpus["prefix"], "--split",
                        "90,10,0"] + common, world_size=1)
    p = data.build_pretraining_datasets(data_settings(plain), plain.seq_length, plain.seed, tok, [8, 4, 0])[0][0]
    assert "attention_mask" not in p and p["loss_mask"].min() == 1


def test_cyclic_order_and_parallel_reads():
    from megatron_patch.training import data

    base = data.MockDataset(250, 4, 1, 10)
    cyc = data.for_training(base, data_settings(args("--dataloader-type", "cyclic")), 1234)
    first = [int(cyc[i]["tokens"][0]) for i in range(10)]
    second = [int(cyc[i]["tokens"][0]) for i in range(10, 20)]
    plain = [int(base[i]["tokens"][0]) for i in range(10)]
    assert sorted(first) == sorted(plain) == sorted(second) and first != plain and first != second
    par = data.for_training(base, data_settings(args("--num-workers", "3")), 1234)
    batches = data.step_batches(par, 0, 2, 1, 0, 3, torch.device("cpu"))
    ref = data.step_batches(base, 0, 2, 1, 0, 3, torch.device("cpu"))
    assert all(torch.equal(x["tokens"], y["tokens"]) for x, y in zip(batches, ref))


def test_logging_flags(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from megatron_patch.training.logging import Metrics

    calls = []
    fake = types.SimpleNamespace(init=lambda **kw: calls.append(("init", kw)),
                                 log=lambda row, step: calls.append(("log", step, row)),
                                 finish=lambda: calls.append(("finish",)))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    a = args("--log-timers-to-tensorboard", "--log-validation-ppl-to-tensorboard", "--log-batch-size-to-tensorboard",
             "--tensorboard-queue-size", "5",
             "--wandb-project", "proj", "--wandb-exp-name", "run1", "--wandb-save-dir", str(tmp_path / "wb"),
             "--tensorboard-dir", str(tmp_path / "tb"))
    m = Metrics(logging_settings(a), reporting=True)
    assert m.tb._get_file_writer().event_writer._async_writer._byte_queue.maxsize == 5  # --tensorboard-queue-size
    m.record_step(1, 2.0, 1e-3, 0.5, 10, False)
    m.log_window(1, 2, 100.0, 0.2, None, iteration_time=0.25, batch_size=8)
    m.record_eval(1, 1.0)
    m.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert acc.Scalars("iteration-time")[0].value == 0.25
    assert acc.Scalars("batch-size")[0].value == 8  # --log-batch-size-to-tensorboard
    assert acc.Scalars("validation ppl")[0].value == pytest.approx(np.e, rel=1e-6)
    init = calls[0][1]
    assert (init["project"], init["name"], init["dir"]) == ("proj", "run1", str(tmp_path / "wb"))
    assert ("log", 1, {"lm loss": 2.0, "learning-rate": 1e-3, "grad-norm": 0.5}) in calls and calls[-1] == ("finish",)


# ----------------------------------------------------------------------------- 2-process training jobs


def _common(cfg):
    return ["--model-config", cfg, "--mock-data", "--seq-length", "16", "--micro-batch-size", "1",
            "--global-batch-size", "4", "--lr", "1e-2", "--lr-warmup-iters", "1", "--log-interval", "100",
            "--transformer-impl", "local", "--rope-impl", "torch", "--seed", "7", "--use-distributed-optimizer",
            "--train-iters", "4"]


def _losses(path):
    return [json.loads(line)["loss"] for line in open(path) if '"loss"' in line]


def as_megatron_lm_training_checkpoint(ckpt: str, hf_dir: str) -> None:
    """Rewrite a checkpoint this trainer saved into what Megatron-LM saves for the same state: its args (no
    model_args, its names, enums), consumed samples inside args, ONE RNG state with NumPy's own tuple,
    ``_extra_state`` entries, ``distrib_optim.pt`` as a plain dict."""
    from megatron_patch.checkpointing import layout
    from tests.test_megatron_lm_checkpoints import mlm_args

    iteration = layout.read_tracker(ckpt)
    iter_dir = os.path.join(ckpt, layout.iteration_dir_name(iteration))
    for name in layout.rank_dirs(iter_dir):
        path = os.path.join(iter_dir, name, layout.RANK_FILE)
        sd = layout.load_rank_file(path)
        ours = sd["args"]
        sd["args"] = mlm_args(ours, consumed_train_samples=sd.pop("consumed_train_samples"), iteration=iteration,
                              data_parallel_size=2, use_distributed_optimizer=True)
        rng = sd["rng_state"][0]
        n = rng["np_rng_state"]
        rng["np_rng_state"] = (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
        sd["rng_state"] = [rng]
        for k in [k for k in sd["model"] if k.endswith("linear_fc2.weight")]:
            sd["model"][k[: -len("weight")] + "_extra_state"] = None
        torch.save(sd, path)
        dpath = os.path.join(iter_dir, name, "distrib_optim.pt")
        states = torch.load(dpath, weights_only=True)
        torch.save(states[0], dpath)


def _jobs(cfg, tmp):
    import torch.distributed as dist

    from megatron_patch import pretrain

    def job(argv):
        assert pretrain.run(pretrain.prepare(argv), teardown=False) == 0, argv
        dist.barrier()

    base = _common(cfg)
    job(base + ["--metrics-file", f"{tmp}/full.jsonl"])
    overlap = base + ["--overlap-grad-reduce", "--overlap-param-gather"]
    # Overlapped parameter gather: the checkpoint holds the updated weights (the pending gather is finished).
    job(overlap + ["--save", f"{tmp}/ov", "--exit-interval", "2", "--metrics-file", f"{tmp}/ov1.jsonl"])
    job(overlap + ["--load", f"{tmp}/ov", "--metrics-file", f"{tmp}/ov2.jsonl"])
    # A checkpoint in Megatron-LM's format resumes exactly (weights, Adam state, scheduler, progress).
    job(base + ["--save", f"{tmp}/noopt", "--exit-interval", "2", "--no-save-optim", "--metrics-file",
                f"{tmp}/nosave.jsonl"])
    job(base + ["--save", f"{tmp}/mlm", "--exit-interval", "2", "--metrics-file", f"{tmp}/m1.jsonl"])
    if dist.get_rank() == 0:
        as_megatron_lm_training_checkpoint(f"{tmp}/mlm", cfg)
    dist.barrier()
    resume = base[2:] + ["--load", f"{tmp}/mlm"]  # the architecture from the checkpoint, not --model-config
    try:
        pretrain.prepare(resume)
        needs_hf = False
    except ValueError as e:
        needs_hf = "--hf-config" in str(e)
    job(resume + ["--hf-config", cfg, "--metrics-file", f"{tmp}/m2.jsonl"])
    # SGD on an uneven pipeline (3 + 1 layers): N + N iterations with a save between equal 2N, both formats.
    sgd = [x for x in base if x != "--use-distributed-optimizer"] + [
        "--optimizer", "sgd", "--pipeline-model-parallel-size", "2", "--decoder-first-pipeline-num-layers", "3"]
    job(sgd + ["--metrics-file", f"{tmp}/sgd.jsonl"])
    for fmt in ("torch", "torch_dist"):
        fmt_args = sgd + ["--ckpt-format", fmt]
        job(fmt_args + ["--save", f"{tmp}/sgd_{fmt}", "--exit-interval", "2", "--metrics-file",
                        f"{tmp}/sgd_{fmt}1.jsonl"])
        job(fmt_args + ["--load", f"{tmp}/sgd_{fmt}", "--metrics-file", f"{tmp}/sgd_{fmt}2.jsonl"])
    return needs_hf


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from megatron_patch.testing.tiny_models import hf_config

    cfg = str(tmp_path_factory.mktemp("cfg"))
    hf_config("llama3.1").save_pretrained(cfg)
    tmp = str(tmp_path_factory.mktemp("runs"))
    needs_hf = spawn.run(_jobs, 2, cfg, tmp, timeout=900)[0]
    return tmp, needs_hf


def test_overlapped_communication_trains_the_same(runs):
    tmp, _ = runs
    full = _losses(f"{tmp}/full.jsonl")
    assert len(full) == 4
    assert _losses(f"{tmp}/ov1.jsonl") + _losses(f"{tmp}/ov2.jsonl") == pytest.approx(full, rel=1e-6)


def test_no_save_optim(runs):
    from megatron_patch.checkpointing import layout

    tmp, _ = runs
    assert _losses(f"{tmp}/nosave.jsonl") == _losses(f"{tmp}/full.jsonl")[:2]
    for ckpt, has_optim in (("noopt", False), ("ov", True)):
        rank_dir = os.path.join(tmp, ckpt, "iter_0000002", "mp_rank_00")
        sd = layout.load_rank_file(os.path.join(rank_dir, layout.RANK_FILE))
        assert ("optimizer" in sd) == has_optim and os.path.isfile(f"{rank_dir}/distrib_optim.pt") == has_optim
        assert "opt_param_scheduler" in sd and "model" in sd


def test_sgd_on_an_uneven_pipeline_resumes_exactly(runs, monkeypatch):
    from megatron_patch import pretrain
    from megatron_patch.checkpointing import layout

    tmp, _ = runs
    full = _losses(f"{tmp}/sgd.jsonl")
    assert len(full) == 4 and full != _losses(f"{tmp}/full.jsonl")
    for fmt in ("torch", "torch_dist"):
        assert _losses(f"{tmp}/sgd_{fmt}1.jsonl") + _losses(f"{tmp}/sgd_{fmt}2.jsonl") == full, fmt  # bit-exact
    # The torch rank files: 3 and 1 layers, SGD's momentum as the optimizer state, the split in the args.
    files = [layout.load_rank_file(layout.rank_file(f"{tmp}/sgd_torch", 2, 0, p, 2)) for p in range(2)]
    assert [len({k.split(".")[2] for k in f["model"] if k.startswith("decoder.layers.")}) for f in files] == [3, 1]
    state = files[0]["optimizer"]["state"]  # fp32 without the distributed optimizer: torch's own state dict
    assert state and all(set(s) == {"momentum_buffer"} for s in state.values())
    assert files[0]["args"].decoder_first_pipeline_num_layers == 3
    # Resuming it at an even split is refused before any process group: the optimizer state would not fit.
    monkeypatch.setenv("WORLD_SIZE", "2")
    argv = _common("")[2:] + ["--optimizer", "sgd", "--pipeline-model-parallel-size", "2", "--load",
                              f"{tmp}/sgd_torch"]  # the model from the checkpoint (no --model-config)
    argv.remove("--use-distributed-optimizer")
    with pytest.raises(pretrain.StartupError, match=r"saved at TP=1 PP=2 VPP=None first/last stage layers 3/None, "
                                                    r"this run is TP=1 PP=2 VPP=None;"):
        pretrain.prepare(argv)


def test_megatron_lm_checkpoint_resumes_exactly(runs):
    tmp, needs_hf = runs
    assert needs_hf  # without --hf-config: the error names it
    full = _losses(f"{tmp}/full.jsonl")
    assert _losses(f"{tmp}/m1.jsonl") + _losses(f"{tmp}/m2.jsonl") == full
