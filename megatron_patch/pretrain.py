"""Pretraining and SFT entry point: ``torchrun --nproc-per-node N -m megatron_patch.pretrain [ARGS]``.

Order of work: parse and validate the arguments (no process is started for a bad combination), read
the model architecture (``--model-config`` or the ``--load`` checkpoint) and the data, then
initialize the process groups, build model / optimizer / scheduler, load, train, save.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Optional, Sequence


def hf_config_for(args) -> Optional[dict]:
    """The HF config.json of the run: ``--model-config``, else the one ``--load`` carries (HF directory or a
    converted checkpoint), else None."""
    from megatron_patch.models.family import read_hf_config

    if args.model_config:
        if not os.path.exists(args.model_config):
            raise FileNotFoundError(f"--model-config {args.model_config} does not exist")
        return read_hf_config(args.model_config)
    if getattr(args, "hf_config", None):  # a Megatron-LM checkpoint's HF config
        return read_hf_config(args.hf_config)
    if args.load and os.path.isfile(os.path.join(args.load, "config.json")):
        return read_hf_config(args.load)
    return None


def model_args_for(args):
    """The model architecture: ``--model-config``, else the ``--load`` HF directory or Megatron checkpoint.

    A HF directory given to ``--load`` is checked whole (every tensor present with its shape, every shard
    readable) here, before any process group exists; with ``--model-config`` too, both must describe the
    same architecture.
    """
    from megatron_patch.checkpointing.megatron_format import open_checkpoint
    from megatron_patch.checkpointing.sources import is_hf_dir
    from megatron_patch.models.family import args_from_hf

    margs = args_from_hf(hf_config_for(args)) if args.model_config else None
    if args.load and is_hf_dir(args.load):
        from megatron_patch.checkpointing.hf import HFSource

        source = HFSource(args.load)
        if margs is not None and margs != source.args:
            raise ValueError(f"--load {args.load} holds a {source.args.architecture} that differs from "
                             f"--model-config ({margs.architecture}{_first_difference(margs, source.args)})")
        source.preflight()
        return source.args
    return margs if margs is not None else open_checkpoint(args.load, getattr(args, "hf_config", None)).args


def _first_difference(a, b) -> str:
    import dataclasses

    for f in dataclasses.fields(a):
        if getattr(a, f.name) != getattr(b, f.name):
            return f": {f.name} {getattr(b, f.name)} vs {getattr(a, f.name)}"
    return ""


def build_datasets(args, margs):
    """(train, valid, test) datasets; checked before any heavy work."""
    from megatron_patch.training import data

    n_train = args.train_iters * args.global_batch_size
    n_eval = (args.train_iters // args.eval_interval + 1) * args.eval_iters * args.global_batch_size \
        if args.eval_interval else 0
    if args.mock_data:
        return (data.for_training(data.MockDataset(margs.vocab_size, args.seq_length, args.seed, n_train), args),
                data.MockDataset(margs.vocab_size, args.seq_length, args.seed + 1, max(n_eval, 1)), None)
    tok = data.load_tokenizer(args.tokenizer_model)
    if len(tok) > margs.vocab_size:
        raise data.DataError(f"the tokenizer has {len(tok)} tokens but the model's vocab_size is {margs.vocab_size}")
    if args.sft:
        from megatron_patch.training import sft

        return sft.build_sft_datasets(args, tok)
    train, valid, test = data.build_pretraining_datasets(args, data.DatasetTokenizer(tok), [n_train, n_eval, 0])
    data.validate_sizes(train, n_train)
    return data.for_training(train, args), valid, test


def main(argv: Optional[Sequence[str]] = None) -> int:
    # megatron-core warns at import about every missing optional accelerator library.
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|apex).*")
    from megatron_patch.training.arguments import ArgumentError, parse_args

    try:
        args = parse_args(argv)
    except ArgumentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.load and not os.path.isdir(args.load):
        print(f"error: --load {args.load} does not exist", file=sys.stderr)
        return 2
    try:
        margs = model_args_for(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return run(args, margs)


def run(args, margs, teardown: bool = True) -> int:
    """Train with parsed arguments; ``teardown=False`` keeps the process group (tests run several jobs)."""
    import torch.distributed as dist

    from megatron_patch import runtime
    from megatron_patch.training import checkpoint, loop
    from megatron_patch.training.data import DataError
    from megatron_patch.training.logging import Metrics, MetricsError

    from megatron_patch.training.arguments import ArgumentError, for_model

    try:
        args = for_model(args, margs)
    except ArgumentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    config = loop.transformer_config_for(args, margs)
    runtime.initialize(tp=args.tensor_model_parallel_size, pp=args.pipeline_model_parallel_size, vpp=args.vpp,
                       ep=args.expert_model_parallel_size, etp=args.expert_tensor_parallel_size,
                       seed=args.seed)
    try:
        try:
            datasets = build_datasets(args, margs)
            metrics = Metrics(args.metrics_file, args.tensorboard_dir, options=args)
        except (DataError, MetricsError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        chunks = loop.wrap_ddp(args, config, loop.build_model_chunks(args, margs, config))
        optimizer, scheduler = loop.build_optimizer(args, chunks)
        loop.install_hooks(config, chunks, optimizer)
        state = loop.TrainState()
        if args.load:
            state = checkpoint.load(args, margs, chunks, optimizer, scheduler)
            if dist.get_rank() == 0:
                print(f"loaded {args.load} (iteration {state.iteration}, "
                      f"{state.consumed_train_samples} samples consumed)", flush=True)

        def save_fn(s):
            checkpoint.save(args, margs, chunks, optimizer, scheduler, s)

        def save_hf_fn(s):
            checkpoint.save_hf(args, margs, chunks, s, hf_config_for(args))

        last_saved = state.iteration if args.load and not args.finetune else -1
        state = loop.train(args, margs, chunks, optimizer, scheduler, state, datasets, metrics, save_fn,
                           save_hf_fn)
        if args.save and (args.save_interval is None or state.iteration % args.save_interval) \
                and state.iteration != last_saved:
            save_fn(state)
        if args.save_hf and (args.save_hf_interval is None or state.iteration % args.save_hf_interval):
            save_hf_fn(state)
        metrics.close()
        return 0
    finally:
        if teardown:
            runtime.teardown()


if __name__ == "__main__":
    sys.exit(main())
