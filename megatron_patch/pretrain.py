"""Pretraining and SFT entry point: ``torchrun --nproc-per-node N -m megatron_patch.pretrain [ARGS]``.

Order of work: parse and validate the arguments, read the model architecture (``--model-config`` or the
``--load`` checkpoint) and check that the checkpoint can be resumed with these arguments (layout,
learning-rate schedule) -- all before any process group exists, so a bad combination ends in one
``error:`` line from rank 0 and exit status 2 (``prepare``). Then ``run`` initializes the process groups,
builds model / optimizer / scheduler, loads, trains and saves; a failure found there is one ``error:``
line from one rank (``training.errors``), and SIGTERM/SIGINT stop the run (a save in progress removes its
temporary folder) with status 128 + the signal number.
"""

from __future__ import annotations

import os
import warnings
from typing import Optional, Sequence


class StartupError(ValueError):
    """A problem found before any process group exists (bad arguments, checkpoint, config)."""


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


def model_args_for(args, info=None):
    """The model architecture: ``--model-config``, else the ``--load`` HF directory or Megatron checkpoint
    (``info``: that checkpoint, if already opened).

    A HF directory given to ``--load`` is checked whole (every tensor present with its shape, every shard
    readable) here, before any process group exists. With both, one source of truth: ``--model-config`` must
    describe the model ``--load`` holds (every disagreeing field named), whatever kind of checkpoint it is.
    """
    from megatron_patch.checkpointing.megatron_format import open_checkpoint
    from megatron_patch.checkpointing.sources import is_hf_dir
    from megatron_patch.models.family import args_from_hf, check_config_agrees

    source = loaded = None
    if args.load and is_hf_dir(args.load):
        from megatron_patch.checkpointing.hf import HFSource

        source = HFSource(args.load)
        loaded = source.args
    elif args.load:
        loaded = (info or open_checkpoint(args.load, getattr(args, "hf_config", None))).args
    if args.model_config:
        cfg = hf_config_for(args)
        if loaded is None:
            return args_from_hf(cfg)
        check_config_agrees(cfg, loaded, f"--model-config {args.model_config}", f"--load {args.load}")
    if source is not None:
        source.preflight()
    return loaded


def prepare(argv: Optional[Sequence[str]] = None):
    """Arguments and model args, with every check that needs no process group; ``StartupError`` if one fails."""
    from megatron_patch import safety
    from megatron_patch.checkpointing.megatron_format import open_checkpoint
    from megatron_patch.checkpointing.sources import is_hf_dir
    from megatron_patch.training import checkpoint
    from megatron_patch.training.arguments import for_model, parse_args

    try:
        args = parse_args(argv)
        if args.load and not os.path.isdir(args.load):
            raise FileNotFoundError(f"--load {args.load} does not exist")
        info = None
        if args.load and not is_hf_dir(args.load):
            info = open_checkpoint(args.load, getattr(args, "hf_config", None))
        margs = model_args_for(args, info)
        if info is not None:
            checkpoint.check_resume(for_model(args, margs), info)
        if args.save:
            safety.check_writable(args.save, "--save")
        if args.save_hf:
            from megatron_patch.checkpointing.hf_export import check_output

            data = tuple(args.data_path or ())
            check_output(args.save_hf, (args.load, args.model_config, args.tokenizer_model, args.save) + data)
    except (ValueError, OSError) as e:
        raise StartupError(safety.one_line(e)) from None
    return args, margs


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
    from megatron_patch import safety
    from megatron_patch.training import errors

    try:
        with safety.signals_raise():
            try:
                args, margs = prepare(argv)
            except StartupError as e:
                errors.before_start(str(e))
                return 2
            return run(args, margs)
    except safety.Interrupted as e:  # before the run started (a run reports its own)
        errors.before_start(f"interrupted by {e}")
        return 128 + e.signum


def run(args, margs, teardown: bool = True) -> int:
    """Train with parsed arguments; ``teardown=False`` keeps the process group (tests run several jobs).

    Returns the exit status: 0, 1 (NaN/Inf loss or gradients), 2 (bad input found after start-up),
    128 + signal number (interrupted).
    """
    from megatron_patch import runtime, safety
    from megatron_patch.training import errors, loop
    from megatron_patch.training.arguments import ArgumentError, for_model

    try:
        args = for_model(args, margs)
    except ArgumentError as e:
        errors.before_start(str(e))
        return 2
    config = loop.transformer_config_for(args, margs)
    errors.new_run()
    failed = True
    try:
        runtime.initialize(tp=args.tensor_model_parallel_size, pp=args.pipeline_model_parallel_size, vpp=args.vpp,
                           ep=args.expert_model_parallel_size, etp=args.expert_tensor_parallel_size,
                           seed=args.seed)
        _train(args, margs, config)
        failed = False
        return 0
    except safety.Interrupted as e:
        errors.report(f"interrupted by {e}; no checkpoint was left half-written")
        return 128 + e.signum
    except loop.NonFiniteError as e:
        errors.report(str(e))
        return 1
    except (ValueError, OSError) as e:  # DataError, MetricsError, CheckpointError, ResumeError, ...
        errors.report(safety.one_line(e))
        return 2
    except Exception:
        if errors.already_reported():
            return 1  # a peer failed first and said why; this is the echo of its exit in a collective
        raise
    finally:
        if teardown:
            runtime.teardown(barrier=not failed)


def _train(args, margs, config) -> None:
    import torch.distributed as dist

    from megatron_patch.training import checkpoint, loop
    from megatron_patch.training.logging import Metrics

    datasets = build_datasets(args, margs)
    metrics = Metrics(args.metrics_file, args.tensorboard_dir, options=args)
    try:
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
    finally:
        metrics.close()


if __name__ == "__main__":
    from megatron_patch.safety import exit_with

    exit_with(main())
