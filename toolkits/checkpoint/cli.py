"""Command line of the checkpoint converter: a thin argparse layer over ``toolkits.checkpoint.convert``.

Every expected failure (bad input, bad layout, existing output, an output overlapping the input or being
written by another run, corrupted or non-finite weights, a full disk) ends in one ``error: ...`` line on
stderr and exit status 2; a failed ``--verify`` prints the diff and exits 1. SIGTERM/SIGINT remove the
partial output and exit with 128 + the signal number within seconds. Nothing is left half-written.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional

from megatron_patch import dtypes, safety
from megatron_patch.checkpointing.layout import CKPT_FORMATS
from megatron_patch.models.builder import TRANSFORMER_IMPLS
from megatron_patch.parallel import ParallelLayout
from toolkits.checkpoint import convert
from toolkits.checkpoint.verify import DEFAULT_TOL


def _layout_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("target layout")
    g.add_argument("--target-tensor-parallel-size", "--tp", dest="tp", type=int, default=1,
                   help="tensor-parallel size of the output checkpoint (default 1)")
    g.add_argument("--target-pipeline-parallel-size", "--pp", dest="pp", type=int, default=1,
                   help="pipeline-parallel size of the output checkpoint (default 1)")
    g.add_argument("--target-expert-parallel-size", "--ep", dest="ep", type=int, default=1,
                   help="expert-parallel size of the output checkpoint (MoE models; default 1)")
    g.add_argument("--target-expert-tensor-parallel-size", "--etp", dest="etp", type=int, default=None,
                   help="tensor-parallel size of the experts (MoE models; default: the tensor-parallel size)")
    g.add_argument("--decoder-first-pipeline-num-layers", type=int, default=None,
                   help="layers on the first pipeline stage (uneven split, Megatron-LM semantics)")
    g.add_argument("--decoder-last-pipeline-num-layers", type=int, default=None,
                   help="layers on the last pipeline stage (uneven split, Megatron-LM semantics)")
    g.add_argument("--ckpt-format", choices=CKPT_FORMATS, default="torch",
                   help="torch: mp_rank_* rank files; torch_dist: megatron-core dist_checkpointing")
    g.add_argument("--transformer-impl", choices=[i for i in TRANSFORMER_IMPLS if i != "auto"], default=None,
                   help="state-dict names to write (default: transformer_engine if usable here, else local)")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=None,
                   help="pad the vocab to a multiple of this x TP (default 128, or the source's value)")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--load-dir", required=True, help="input checkpoint directory")
    p.add_argument("--save-dir", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--params-dtype", choices=tuple(dtypes.BY_NAME), default=None,
                   help="dtype of the written weights (default: the source's dtype)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --save-dir")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--workers", type=int, default=None, help="parallel writer threads (default: min(4, cores))")
    p.add_argument("--allow-non-finite", action="store_true",
                   help="convert weights holding NaN/Inf (each such tensor is named on stderr) instead of refusing")


def _hf_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hf-config", default=None, metavar="DIR",
                   help="checkpoints written by Megatron-LM: the model's HF directory (or config.json) with its "
                   "tokenizer, for the architecture, true vocab size and rope scaling Megatron-LM's args lack")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m toolkits.checkpoint",
                                     description="Convert checkpoints between HF safetensors and Megatron formats.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("hf2mcore", help="HF safetensors directory -> Megatron checkpoint")
    _common(p)
    _layout_args(p)
    p.add_argument("--allow-extra-tensors", action="store_true",
                   help="skip (and name on stderr) tensors the model has no place for, instead of refusing")
    p.add_argument("--verify", action="store_true", help="compare fp32 logits with HF transformers afterwards")
    p = sub.add_parser("mcore2hf", help="Megatron checkpoint (release or training) -> HF safetensors directory")
    _common(p)
    _hf_config(p)
    p.add_argument("--verify", action="store_true", help="compare fp32 logits with the source checkpoint")
    p.add_argument("--adapter-only", action="store_true",
                   help="a checkpoint with LoRA adapters: write them as a HF PEFT adapter (adapter_config.json + "
                   "adapter_model.safetensors) instead of the merged model")
    p = sub.add_parser("mcore2mcore", help="Megatron checkpoint -> another TP/PP layout or format")
    _common(p)
    _hf_config(p)
    _layout_args(p)
    return parser


def _target(args: argparse.Namespace) -> ParallelLayout:
    """The target layout flags as one ``ParallelLayout`` (checked against the model by the conversion)."""
    return ParallelLayout(tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp,
                          first_stage_layers=args.decoder_first_pipeline_num_layers,
                          last_stage_layers=args.decoder_last_pipeline_num_layers)


def _report(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    # Before anything reads the input (the progress bar's parameter count included).
    hf_config = getattr(args, "hf_config", None)
    safety.check_output_path(args.save_dir, [args.load_dir, hf_config], args.overwrite)
    total = 0 if args.quiet else convert.total_params(args.command, args.load_dir, hf_config)
    update, close = convert.progress_bar(total, args.command, not args.quiet)
    start = time.perf_counter()
    checks = dict(allow_non_finite=args.allow_non_finite, report=_report)
    try:
        if args.command == "hf2mcore":
            divisible = args.make_vocab_size_divisible_by
            out = convert.hf2mcore(args.load_dir, args.save_dir, _target(args), args.ckpt_format,
                                   args.transformer_impl, args.params_dtype, 128 if divisible is None else divisible,
                                   args.overwrite, args.workers, update,
                                   allow_extra_tensors=args.allow_extra_tensors, **checks)
        elif args.command == "mcore2hf":
            if args.adapter_only and args.verify:
                raise ValueError("--verify compares models; it cannot check an --adapter-only export")
            out = convert.mcore2hf(args.load_dir, args.save_dir, args.params_dtype, args.overwrite, args.workers,
                                   update, hf_config=hf_config, adapter_only=args.adapter_only, **checks)
        else:
            out = convert.mcore2mcore(args.load_dir, args.save_dir, _target(args), args.ckpt_format,
                                      args.transformer_impl, args.params_dtype, args.make_vocab_size_divisible_by,
                                      args.overwrite, args.workers, update, hf_config=hf_config, **checks)
    finally:
        close()
    if not args.quiet:
        print(f"wrote {out} in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    if args.command != "mcore2hf":
        print_megatron_lm_advice(out)
    if getattr(args, "verify", False):
        from toolkits.checkpoint.verify import verify_checkpoint

        hf_dir, ckpt_dir = (args.load_dir, out) if args.command == "hf2mcore" else (out, args.load_dir)
        result = verify_checkpoint(hf_dir, ckpt_dir, tol=DEFAULT_TOL, hf_config=hf_config)
        print(result.line())
        return 0 if result.ok else 1
    return 0


def print_megatron_lm_advice(ckpt_dir: str) -> None:
    """What a Megatron-LM user must add to ``--use-checkpoint-args`` for this checkpoint, and a warning when
    Megatron-LM's own model builder cannot reproduce its rope (this project's model provider can)."""
    from megatron_patch.checkpointing import megatron_lm
    from megatron_patch.checkpointing.megatron_format import open_checkpoint

    info = open_checkpoint(ckpt_dir)
    flags = megatron_lm.extra_flags(info.args, info.ns)
    print("Megatron-LM: --use-checkpoint-args does not restore these; pass them too: " + " ".join(flags))
    problem = megatron_lm.stock_rope_problem(info.args)
    if problem:
        print(f"warning: Megatron-LM's own model builder (pretrain_gpt.py) cannot reproduce this model's rope: "
              f"{problem}; train it with this project's model provider (examples/megatron_lm/pretrain_gpt.py "
              "--hf-config DIR) or with python -m megatron_patch.pretrain", file=sys.stderr)


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        with safety.signals_raise():
            return run(args)
    except safety.Interrupted as e:
        print(f"error: interrupted by {e}; the partial output was removed", file=sys.stderr)
        return 128 + e.signum
    except (ValueError, FileExistsError, FileNotFoundError, KeyError, OSError) as e:
        print(f"error: {safety.one_line(e)}", file=sys.stderr)
        return 2
