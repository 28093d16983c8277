"""Pretraining and SFT entry point: ``torchrun --nproc-per-node N -m megatron_patch.pretrain [ARGS]``.

Order of work: ``prepare`` parses and checks the arguments, opens ``--load`` once (a Megatron checkpoint:
tracker, args, layout; a HF directory: every tensor present with its shape), reads the model architecture
(``--model-config`` or the checkpoint) and checks that the run can resume the checkpoint (layout,
learning-rate schedule) -- all before any process group exists, so a bad combination ends in one ``error:``
line from rank 0 and exit status 2. What it returns is the run's one frozen ``RunConfig``. Then ``run``
initializes the process groups, builds the ``Trainer`` (model, optimizer, scheduler), loads, trains and saves;
a failure found there is one ``error:`` line from one rank (``training.errors``), and SIGTERM/SIGINT stop the
run (a save in progress removes its temporary folder) with status 128 + the signal number.
"""

from __future__ import annotations

import os
import warnings
from typing import Optional, Sequence


class StartupError(ValueError):
    """A problem found before any process group exists (bad arguments, checkpoint, config)."""


def _hf_config(args, opened: bool) -> Optional[dict]:
    """The HF config.json of the run: ``--model-config``; once ``--load`` is open (``opened``), else a Megatron-LM
    checkpoint's ``--hf-config``, else the one ``--load`` carries (HF directory or converted checkpoint)."""
    from megatron_patch.models.family import read_hf_config

    if args.model_config:
        if not os.path.exists(args.model_config):
            raise FileNotFoundError(f"--model-config {args.model_config} does not exist")
        return read_hf_config(args.model_config)
    if not opened:
        return None
    if args.hf_config:
        return read_hf_config(args.hf_config)
    if args.load and os.path.isfile(os.path.join(args.load, "config.json")):
        return read_hf_config(args.load)
    return None


def _model_args(args, hf_config: Optional[dict], info, hf_source):
    """The model architecture: the ``--load`` checkpoint's (``info`` / ``hf_source``, opened), else
    ``--model-config``'s. With both, one source of truth: ``--model-config`` must describe the model ``--load``
    holds (every disagreeing field named), whatever kind of checkpoint it is."""
    from megatron_patch.models.family import args_from_hf, check_config_agrees

    loaded = hf_source.args if hf_source is not None else info.args if info is not None else None
    if loaded is None:
        return args_from_hf(hf_config)
    if args.model_config:
        check_config_agrees(hf_config, loaded, f"--model-config {args.model_config}", f"--load {args.load}")
    return loaded


def prepare(argv: Optional[Sequence[str]] = None, world_size: Optional[int] = None):
    """The run's ``RunConfig``, with every check that needs no process group; ``StartupError`` if one fails.

    ``--load`` is opened here, once: a Megatron checkpoint (``RunConfig.resume``; this rank reads the pickles of
    one rank file per pipeline stage for its args and layer count, the files it restores later) or a HF directory
    checked whole (``RunConfig.hf_source``). With ``--model-config`` too, both must describe the same model.
    ``--save`` must be writable (``safety.check_writable``), ``--save-hf`` too and apart from every input.
    """
    from megatron_patch import safety
    from megatron_patch.checkpointing.megatron_format import open_checkpoint
    from megatron_patch.checkpointing.sources import is_hf_dir
    from megatron_patch.training import lora
    from megatron_patch.training.arguments import parse_args, run_config
    from megatron_patch.training.resume import check_resume

    try:
        args = parse_args(argv, world_size)
        if args.load and not os.path.isdir(args.load):
            raise FileNotFoundError(f"--load {args.load} does not exist")
        hf_config = _hf_config(args, opened=False)
        info = hf_source = None
        if args.load and is_hf_dir(args.load):
            from megatron_patch.checkpointing.hf import HFSource

            hf_source = HFSource(args.load)
        elif args.load:
            info = open_checkpoint(args.load, args.hf_config, all_rank_files=False)
        margs = _model_args(args, hf_config, info, hf_source)
        if hf_source is not None:
            hf_source.preflight()
        hf_config = hf_config or _hf_config(args, opened=True)
        config = run_config(args, margs, resume=info, hf_source=hf_source, hf_config=hf_config)
        check_resume(config)
        lora.check_resume(config)
        if args.save:
            safety.check_writable(args.save, "--save")
        if args.save_hf:
            from megatron_patch.checkpointing.hf_export import check_output

            check_output(args.save_hf, (args.load, args.model_config, args.tokenizer_model, args.save)
                         + tuple(args.data_path or ()))
    except (ValueError, OSError) as e:
        raise StartupError(safety.one_line(e)) from None
    return config


def main(argv: Optional[Sequence[str]] = None) -> int:
    # megatron-core warns at import about every missing optional accelerator library.
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|apex).*")
    from megatron_patch import safety
    from megatron_patch.training import errors

    try:
        with safety.signals_raise():
            try:
                config = prepare(argv)
            except StartupError as e:
                errors.before_start(str(e))
                return 2
            return run(config)
    except safety.Interrupted as e:  # before the run started (a run reports its own)
        errors.before_start(f"interrupted by {e}")
        return 128 + e.signum


def run(config, teardown: bool = True) -> int:
    """Train the prepared run; ``teardown=False`` keeps the process group (tests run several jobs).

    Returns the exit status: 0, 1 (NaN/Inf loss or gradients), 2 (bad input found after start-up),
    128 + signal number (interrupted).
    """
    from megatron_patch import runtime, safety
    from megatron_patch.training import errors, loop

    errors.new_run()
    failed = True
    try:
        runtime.initialize(config.layout, seed=config.seed)
        _train(config)
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


def _train(config) -> None:
    from megatron_patch.training.data import build_datasets
    from megatron_patch.training.logging import Metrics
    from megatron_patch.training.trainer import Trainer

    datasets = build_datasets(config)
    metrics = Metrics(config.logging, run=config.scalars())
    try:
        Trainer(config, metrics).fit(datasets)
    finally:
        metrics.close()


if __name__ == "__main__":
    from megatron_patch.safety import exit_with

    exit_with(main())
