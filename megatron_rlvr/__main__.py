"""Command line: `python -m megatron_rlvr <command>`.

    train   --config FILE [key=value ...]     the RL trainer (launch with torchrun)
    eval    --config FILE [key=value ...]     validation only: avg@k / pass@k of model.hf_dir
    demo    [--config demo_top20|demo_full]   the tiny CPU demo end to end
    plan    --config FILE --nodes N ...       memory and layout planner
    config  [--config FILE] [key=value ...]   print every config field (or the resolved config)

A user's mistake (bad flag, config, path, data row, checkpoint) ends with one line,
`megatron_rlvr <command>: error: ...`, and exit code 2; MEGATRON_RLVR_DEBUG=1 shows the traceback.
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


def preflight(cfg, *, training: bool) -> None:
    """Cheap checks of every path a run reads or writes, before torch.distributed, the model or
    vLLM start: inputs exist and are what they should be, the output directory is writable, and
    nothing the run replaces (the final HF export) is an input or a directory we did not write."""
    from megatron_rlvr import safety
    from megatron_rlvr.config import ConfigError
    from megatron_rlvr.models.spec import read_model_spec

    safety.check_input_path(cfg.model.hf_dir, "model.hf_dir")
    read_model_spec(cfg.model.hf_dir)
    files = [("data.val_files", f) for f in cfg.data.val_files]
    if training:
        files = [("data.train_files", f) for f in cfg.data.train_files] + files
    for field, path in files:
        safety.check_input_path(path, field, kind="file")
    if not training:
        return
    out = cfg.logging.output_dir
    if os.path.lexists(out) and not os.path.isdir(out):
        raise ConfigError(f"logging.output_dir {out} exists and is not a directory")
    safety.check_writable(out, "logging.output_dir")
    c = cfg.checkpoint
    if c.resume not in ("auto", "never"):
        safety.check_input_path(c.resume, "checkpoint.resume")
    if c.export_hf_at_end:
        export = os.path.join(out, "hf_export")  # replaced at the end of the run
        inputs = [("model.hf_dir", cfg.model.hf_dir), *files]
        if c.resume not in ("auto", "never"):
            inputs.append(("checkpoint.resume", c.resume))
        for field, path in inputs:
            rel = safety._relation(os.path.realpath(path), os.path.realpath(export))
            if rel in ("is", "is inside"):
                raise ConfigError(f"{field} {path} is inside {export}, which this run replaces "
                                  "with its final export (checkpoint.export_hf_at_end); copy it "
                                  "elsewhere or choose another logging.output_dir")
        if os.path.isdir(export) and os.listdir(export) and not safety.is_ours(export):
            raise ConfigError(f"{export} exists and was not written by megatron-rlvr; the final "
                              "export would replace it: move it or choose another "
                              "logging.output_dir")


def cmd_train(args) -> int:
    from megatron_rlvr.trainer import train
    cfg = _load(args)
    preflight(cfg, training=True)
    train(cfg)
    return 0


def cmd_eval(args) -> int:
    from megatron_rlvr.eval import run
    cfg = _load(args)
    if not cfg.data.val_files:
        raise ValueError("data.val_files is empty: nothing to evaluate")
    preflight(cfg, training=False)
    return run(cfg)


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
    """Run one command and return its exit code. Called with argv=None, i.e. as the process's own
    command line (`python -m megatron_rlvr`, every torchrun rank), a command that returns ends the
    process here with that code, without the interpreter's teardown (`fast_exit.exit_now`: seconds
    of CPU per rank once torch, Megatron-Core and vLLM are loaded); the commands close what they
    wrote before they return. An exception still propagates (traceback, exit code 1)."""
    if argv is None:
        from megatron_rlvr.fast_exit import exit_now
        exit_now(_main(list(sys.argv[1:])))
    return _main(list(argv))


def _main(argv: list) -> int:
    # vLLM logs every weight reload at INFO; keep the trainer's one line per step readable.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    if argv and argv[0] == "plan":  # the planner has its own argument parser
        return cmd_plan(argv[1:])
    from megatron_rlvr.safety import OneLineParser, positive_int

    parser = OneLineParser(prog="python -m megatron_rlvr", description=__doc__,
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
    p.add_argument("--nproc", type=positive_int, default=2, help="torchrun processes")
    p.set_defaults(fn=cmd_demo)
    sub.add_parser("plan", help="memory and layout planner (see `plan --help`)")
    args = parser.parse_args(argv)
    return _run_reporting_user_errors(args.fn, args)


def _run_reporting_user_errors(fn, args) -> int:
    """A user's mistake (bad config, missing file, bad row, impossible layout) is one clear line."""
    from megatron_rlvr import safety, watchdog
    from megatron_rlvr.algos.dynamic_sampling import DynamicSamplingError
    from megatron_rlvr.ray_cluster import ClusterError
    from megatron_rlvr.rewards.ray_scorer import RewardActorError
    from megatron_rlvr.rollout.base import RolloutError
    from megatron_rlvr.trainer import TrainingAborted

    try:
        return fn(args)
    except (ValueError, OSError, DynamicSamplingError, TrainingAborted, RolloutError,
            RewardActorError, ClusterError) as e:
        # ValueError covers ConfigError, CheckpointError, bad rows and undecodable bytes;
        # RolloutError a rollout engine that failed, died or stopped answering (named in it).
        if os.environ.get(safety.DEBUG_ENV) or (isinstance(e, OSError)
                                                and not safety.is_user_error(e)):
            raise
        print(f"megatron_rlvr {args.command}: error: {safety.one_line(e)} (set "
              f"{safety.DEBUG_ENV}=1 for the traceback)", file=sys.stderr, flush=True)
        return 2
    except RuntimeError as e:
        # A peer rank ended first (its own error, printed by it, is the cause).
        if not watchdog.peer_gone(e) or os.environ.get(safety.DEBUG_ENV):
            raise
        print(f"megatron_rlvr {args.command}: error: rank {os.environ.get('RANK', '?')}: another "
              f"rank ended first and closed a collective; its own error (above, or in its node's "
              f"log) is the cause: {safety.one_line(e)[:300]} (set {safety.DEBUG_ENV}=1 for the "
              "traceback)", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
