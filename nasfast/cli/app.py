"""Command line: ``nasfast <command> ...``. Bad input exits with status 2 and one clear line."""
from __future__ import annotations

import argparse
import math
import os
import sys
import traceback
from pathlib import Path
from typing import Optional

from nasfast.allocator import tune_malloc
from nasfast.cli import analysis as cli_analysis
from nasfast.cli import nas as cli_nas
from nasfast.cli.common import COMMANDS, command, quiet_libraries
from nasfast.errors import BUG_REPORT, UserError
from nasfast.files import StorageError, writing


@command("prepare-data")
def cmd_prepare_data(args: argparse.Namespace) -> int:
    from nasfast.data.blocks import cached_prepared
    from nasfast.data.prepare import prepare
    from nasfast.space.checks import load_run_config

    cfg = load_run_config(args.config, list(args.set or []))
    quiet_libraries()
    if args.out:
        stats = prepare(cfg.data, Path(args.out), args.num_proc, progress=not args.no_progress)
        where = stats.path
    else:
        if args.num_proc < 1:
            raise UserError(f"--num-proc must be >= 1, got {args.num_proc}")
        where = cached_prepared(cfg.data, args.num_proc, progress=not args.no_progress)
        from nasfast.data.prepare import stats_of

        stats = stats_of(where)
    mb = stats.text_chars / 1e6
    print(f"prepared {stats.train_blocks} train + {stats.dev_blocks} dev blocks of {cfg.data.block_size} tokens from "
          f"{mb:.1f} M characters (hash {stats.hash[:12]}) -> {where}\nuse it with: --set data.prepared={where}")
    return 0


@command("pretrain")
def cmd_pretrain(args: argparse.Namespace) -> int:
    from nasfast.space.checks import load_run_config
    from nasfast.training.runfolder import resume_config
    from nasfast.training.trainer import Trainer

    out = Path(args.out)
    if args.stop_after is not None and args.stop_after < 1:
        raise UserError(f"--stop-after must be >= 1, got {args.stop_after}")
    overrides = list(args.set or [])
    if args.sampler:
        overrides.append(f"sampler.name={args.sampler}")
    if args.deepspeed:
        overrides.append(f"train.deepspeed={args.deepspeed}")
    if args.resume:
        cfg = resume_config(out, args.config, overrides)
    else:
        if not args.config:
            raise UserError("pretrain needs --config (or --resume with an existing --out)")
        cfg = load_run_config(args.config, overrides)
    if cfg.train.deepspeed:  # a bad DeepSpeed config fails here, before any process group or tokenizer work
        from nasfast.engines.deepspeed import ds_env_defaults, load_ds_config

        ds_env_defaults()
        load_ds_config(cfg.train.deepspeed, cfg, int(os.environ.get("WORLD_SIZE", "1")))
    quiet_libraries()
    trainer = None
    try:
        trainer = Trainer(cfg, out, resume=args.resume, stop_after=args.stop_after, progress=not args.no_progress)
        if trainer.world.is_main:  # once, before the first step: which ops run fused, which the eager reference
            print(f"kernels: {trainer.model.ops.describe()}", flush=True)
        summary = trainer.train()
    except StorageError as exc:
        raise exc.then(_rerun_after_disk_fault(trainer)) from None
    if not trainer.world.is_main:
        return 0
    if summary.get("already_completed"):
        print(f"already completed at step {summary['step']}/{summary['steps']}; nothing to do (summary.json kept) -> {out}")
        return 0
    print(f"{summary['status']} at step {summary['step']}/{summary['steps']} in {summary['wall_time_s']:.1f} s "
          f"({summary['tokens_per_s']:.0f} tokens/s) -> {out}")
    if summary["status"] == "diverged":
        print(f"nasfast pretrain: diverged: {summary['message']}", file=sys.stderr)
        return 1
    base = summary["unigram_entropy"]
    width = max(map(len, summary["dev"]), default=0)  # names like largest_with_context, old ones like largest
    for name, r in summary["dev"].items():
        print(f"  dev {name:<{width}} MLM loss {r['loss']:.3f} (unigram baseline {base:.3f})  accuracy {r['accuracy']:.3f}  {r['arch']}")
    if summary["status"].startswith("interrupted"):
        return 130 if "SIGINT" in summary["status"] else 143
    return 0 if summary["status"] in ("completed", "stopped") else 1


def _rerun_after_disk_fault(trainer) -> str:
    """What to run once space is freed: --resume continues from the last checkpoint, if one was written."""
    step = trainer.checkpointer.last_step if trainer is not None else None
    if step is None:  # failed while starting, or before the first checkpoint: the same command starts again
        return "run the same command again"
    return f"rerun with --resume (it continues from the checkpoint of step {step})"


def _count(n: int) -> str:
    """A count in scientific notation, also beyond float range (a space of 9^600 children)."""
    try:
        return f"{float(n):.3e}"
    except OverflowError:  # no str(n): Python refuses to print ints of more than 4300 digits
        exponent = math.floor(math.log10(n))
        return f"{n // 10 ** (exponent - 3) / 1000:.3f}e+{exponent}"


@command("space")
def cmd_space(args: argparse.Namespace) -> int:
    from nasfast.space.checks import build_space, load_run_config
    from nasfast.space.evaluation import reference_children
    from nasfast.space.supernet import child_forward_flops, child_num_params, space_cost_range

    cfg = load_run_config(args.config, args.set)
    space = build_space(cfg)
    vocab, T = cfg.data.vocab_size, cfg.data.block_size
    # without --arch: the run's reference children, labelled as summary.json labels them
    archs = {a: space.parse(a) for a in args.arch} if args.arch else reference_children(space)
    print(f"{space.num_layers} layers x {len(space.candidates)} candidates ({', '.join(space.names)}): {_count(space.size)} children")
    span = space_cost_range(space, vocab, cfg.model.max_len, T)
    print(f"range over all children: params {span['params'][0]:,} .. {span['params'][1]:,}  "
          f"flops/seq(T={T}) {span['flops_per_sequence'][0]:,} .. {span['flops_per_sequence'][1]:,}")
    for label, arch in archs.items():
        named = "" if args.arch else f"{label}: "
        print(f"{named}{space.arch_id(arch)}  params={child_num_params(space, arch, vocab, cfg.model.max_len):,}  "
              f"flops/seq(T={T})={child_forward_flops(space, arch, vocab, T):,}")
    return 0


class _HelpConfig(argparse.Action):
    """``--help-config``: the help text of every config key (those of docs/configuration.md), then exit 0."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        from nasfast.config import config_help_text

        print(config_help_text())
        parser.exit(0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nasfast", description="Weight-sharing NAS supernets over a BERT search space (SPOS, MAGIC-T, MAGIC-A)."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("pretrain", help="train a supernet with masked-LM", description="Train a supernet with masked-LM.")
    p.add_argument("--config", help="YAML run config (e.g. configs/tiny.yaml)")
    p.add_argument("--out", required=True, help="run folder (checkpoints, metrics.jsonl, summary.json, tokenizer)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value (repeatable)")
    p.add_argument("--sampler", help="shortcut for --set sampler.name=...")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--stop-after", type=int, metavar="STEPS", help="checkpoint and stop after this many steps of this invocation")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--help-config", action=_HelpConfig, help="list every config key with its default and meaning, and exit")
    p.add_argument("--deepspeed", metavar="CONFIG.json", help="train with DeepSpeed ZeRO (e.g. configs/ds/zero2.json); "
                                                              "shortcut for --set train.deepspeed=...")
    p = sub.add_parser("prepare-data", help="tokenize a corpus once into memory-mapped token blocks",
                       description="Tokenize data.corpus once (streaming) into a prepared-data folder for data.prepared.")
    p.add_argument("--config", required=True, help="YAML run config (its data section is used)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value (repeatable)")
    p.add_argument("--out", help="prepared-data folder to create (default: the data cache)")
    p.add_argument("--num-proc", type=int, default=1, metavar="N", help="tokenizer processes (default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p = sub.add_parser("space", help="describe the search space; params and FLOPs of architectures",
                       description="Describe a config's search space and the exact cost of architectures.")
    p.add_argument("--config", required=True, help="YAML run config")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value")
    p.add_argument("--arch", action="append", help="architecture string, e.g. 'mha:4|ffn:512|...' (repeatable)")
    cli_analysis.add_parsers(sub)
    cli_nas.add_parsers(sub)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    tune_malloc()  # large CPU tensors reused from the heap, not page-faulted in per allocation
    try:
        parser = build_parser()
        args = _parse_args(parser, _without_local_rank(sys.argv[1:] if argv is None else argv))
        if args.command is None:
            parser.print_help()
            return 2
        with writing(None):  # a full or read-only disk in a writer that did not name its file: still one line
            return COMMANDS[args.command](args)
    except UserError as exc:
        _error(argv, f"error: {exc}")
        return 2
    except KeyboardInterrupt:  # Ctrl-C before training starts (during training it stops the run cleanly)
        _error(argv, "interrupted")
        return 130
    except OSError as exc:  # the file system refused (disk full, permissions): the environment, not a bug
        where = f": {exc.filename}" if exc.filename else ""
        _error(argv, f"error: {exc.strerror or exc}{where}")
        return 2
    except Exception as exc:
        if type(exc).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError, without importing torch here
            _error(argv, "error: out of device memory; lower train.batch_size (raise train.grad_accum to keep the batch)")
            return 2
        traceback.print_exc()
        _error(argv, f"internal error ({type(exc).__name__}): this is a bug in nasfast, not in your input; "
                     f"please report it with the traceback above to {BUG_REPORT}")
        return 1


def _parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``parse_args``, but an unknown argument of a subcommand is reported with that subcommand's usage:
    argparse's top-level parser would print ``usage: nasfast [-h] COMMAND ...``, which says nothing about
    the flags the command takes (missing or bad values are already reported by the subcommand's parser)."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        chosen = sub.choices.get(args.command) if args.command else None
        (chosen or parser).error(f"unrecognized arguments: {' '.join(extra)}")  # exits 2
    return args


def _without_local_rank(argv: list[str]) -> list[str]:
    """Drop the ``--local_rank=N`` the ``deepspeed`` launcher inserts (LOCAL_RANK is in the environment too)."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            continue
        elif arg in ("--local_rank", "--local-rank"):
            skip = True
        else:
            out.append(arg)
    return out


def _error(argv: Optional[list[str]], message: str) -> None:
    args = sys.argv[1:] if argv is None else argv
    command = next((a for a in args if a in COMMANDS), None)
    print(f"nasfast {command + ': ' if command else ''}{message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
