"""Command line: `python -m megatron_rlvr <command>`.

    train   --config FILE [key=value ...]     the RL trainer (launch with torchrun)
    eval    --config FILE [key=value ...]     validation only: avg@k / pass@k of model.hf_dir
    demo    [--config demo_top20|demo_full]   the tiny CPU demo end to end
    plan    --config FILE --nodes N ...       memory and layout planner
    config  [--config FILE] [key=value ...]   print every config field (or the resolved config)
"""
from __future__ import annotations

import argparse
import os
import sys


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.lr=1e-6")


def _load(args):
    from megatron_rlvr.config import load_config
    return load_config(args.config, args.overrides)


def cmd_train(args) -> int:
    from megatron_rlvr.trainer import train
    train(_load(args))
    return 0


def cmd_eval(args) -> int:
    from megatron_rlvr.eval import run
    return run(_load(args))


def cmd_demo(args) -> int:
    from megatron_rlvr import demo
    return demo.run(args.config, out_dir=args.out_dir, nproc=args.nproc)


def cmd_plan(argv) -> int:
    from megatron_rlvr import planner
    return planner.main(argv)


def cmd_config(args) -> int:
    import yaml

    from megatron_rlvr.config import config_to_dict, describe_config
    if args.config or args.overrides:
        print(yaml.safe_dump(config_to_dict(_load(args)), sort_keys=False))
    else:
        print(describe_config())
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # vLLM logs every weight reload at INFO; keep the trainer's one line per step readable.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    if argv and argv[0] == "plan":  # the planner has its own argument parser
        return cmd_plan(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m megatron_rlvr", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn, help_ in (("train", cmd_train, "run RL training"),
                            ("eval", cmd_eval, "evaluate model.hf_dir on data.val_files"),
                            ("config", cmd_config, "describe or resolve the configuration")):
        p = sub.add_parser(name, help=help_)
        _config_args(p)
        p.set_defaults(fn=fn)
    p = sub.add_parser("demo", help="the tiny CPU demo: prepare, warm-start, RL, plot")
    p.add_argument("--config", default="demo_top20", help="demo_top20 (default) or demo_full")
    p.add_argument("--out-dir", default="outputs/demo")
    p.add_argument("--nproc", type=int, default=2, help="torchrun processes")
    p.set_defaults(fn=cmd_demo)
    sub.add_parser("plan", help="memory and layout planner (see `plan --help`)")
    args = parser.parse_args(argv)
    return _run_reporting_user_errors(args.fn, args)


def _run_reporting_user_errors(fn, args) -> int:
    """A user's mistake (bad config, missing file, bad row, impossible layout) is one clear line."""
    from megatron_rlvr.algos.dynamic_sampling import DynamicSamplingError
    from megatron_rlvr.config import ConfigError
    from megatron_rlvr.models.hf_checkpoint import CheckpointError
    from megatron_rlvr.trainer import TrainingAborted

    try:
        return fn(args)
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError, DynamicSamplingError,
            TrainingAborted) as e:
        if os.environ.get("MEGATRON_RLVR_DEBUG"):
            raise
        print(f"megatron_rlvr {args.command}: error: {e} (set MEGATRON_RLVR_DEBUG=1 for the "
              "traceback)", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
