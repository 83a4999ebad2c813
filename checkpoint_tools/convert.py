"""Convert checkpoints between Hugging Face safetensors and our Megatron format.

    python -m checkpoint_tools.convert hf-to-mcore --hf-dir H --out-dir M
    python -m checkpoint_tools.convert mcore-to-hf --mcore-dir M --out-dir H2
    python -m checkpoint_tools.convert dry-run --hf-config config.json --tp 8 --pp 4

The Megatron checkpoint (`megatron_rlvr.checkpoint`) is what the trainer saves and resumes from; it
loads at any TP/PP/CP layout, so the layout used here only decides how many processes share the
work. Both directions run as one CPU process, or under torchrun with --tp/--pp when one process
cannot hold the model:

    torchrun --nproc_per_node=8 -m checkpoint_tools.convert hf-to-mcore --hf-dir H --out-dir M --tp 8

Exports are exact: HF -> Megatron -> HF reproduces every tensor bit for bit in the same dtype.
A user's mistake ends with one `convert: error: ...` line and exit code 2. Output directories
are checked before anything heavy starts (megatron_rlvr/safety.py): never an input, inside one or
containing one, never empty or the working/home/root directory, and `--overwrite` replaces only a
directory megatron-rlvr wrote (every directory written here carries its marker).

This module is the command line only: the export itself (`write_hf`, also the trainer's final
export) lives in `megatron_rlvr.hf_export`, the import in `megatron_rlvr.models.convert`.
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist

from megatron_rlvr import safety
from megatron_rlvr.hf_export import DTYPES, write_hf  # noqa: F401  (write_hf: re-exported)
from megatron_rlvr.models.hf_checkpoint import CheckpointError

PARAM_DTYPES = ("float32", "bfloat16")  # what our Megatron model is built in


def _param_dtype(name: str, where: str) -> torch.dtype:
    if name not in PARAM_DTYPES:
        raise ValueError(f"{where}: Megatron parameters in {name} are not supported; "
                         f"pass --dtype with one of {', '.join(PARAM_DTYPES)}")
    return DTYPES[name]


def _check_layout_fits(tp: int, pp: int) -> None:
    """--tp x --pp processes must divide the processes launched (before anything loads)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    for flag, value in (("--tp", tp), ("--pp", pp)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{flag} must be a positive integer, got {value!r}")
    if world % (tp * pp):
        raise ValueError(f"--tp {tp} x --pp {pp} = {tp * pp} processes, but {world} were "
                         f"launched; run under torchrun --nproc_per_node={tp * pp} (or a "
                         "multiple)")


def _on_every_rank(fn) -> None:
    """Run `fn`; if it fails on any rank, raise that error on every rank, so that no rank is left
    waiting in a collective for one that read a bad file (each stage reads only its own tensors)."""
    error = None
    try:
        fn()
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        error = str(e)
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    first = next((e for e in errors if e), None)
    if first:
        raise CheckpointError(first)


def check_hf_input(spec, hf_dir: str) -> None:
    """Names, shapes and readable headers of every input file, checked before any model is built:
    a wrong checkpoint fails in seconds, not after a 70B model is allocated."""
    from megatron_rlvr.models.convert import check_checkpoint_names, check_floating
    from megatron_rlvr.models.families import family
    from megatron_rlvr.models.hf_checkpoint import HFCheckpoint
    from megatron_rlvr.models.mapping import hf_shapes

    ckpt = HFCheckpoint(hf_dir)
    check_checkpoint_names(spec, ckpt)
    for rule in family(spec.family).rules(spec):
        for name, shape in zip(rule.hf, hf_shapes(spec, rule)):
            found = ckpt.shape(name)
            if found != tuple(shape):
                raise CheckpointError(f"{hf_dir}: tensor {name} has shape {list(found)}, "
                                      f"expected {list(shape)} for {spec.architecture}")
        check_floating(ckpt, rule.hf)


def hf_to_mcore(hf_dir: str, out_dir: str, *, tp: int = 1, pp: int = 1, cp: int = 1,
                dtype: str | None = None, overwrite: bool = False) -> str:
    """Build the model at the layout, load the HF weights, save a Megatron checkpoint."""
    from megatron_rlvr.checkpoint import save_checkpoint
    from megatron_rlvr.models.builder import build_model
    from megatron_rlvr.models.convert import load_hf_weights
    from megatron_rlvr.models.spec import read_model_spec
    from megatron_rlvr.parallel import init_distributed

    safety.check_input_path(hf_dir, "--hf-dir")
    safety.check_output_dir(out_dir, flag="--out-dir", inputs=[("--hf-dir", hf_dir)],
                            overwrite=overwrite)
    _check_layout_fits(tp, pp)
    spec = read_model_spec(hf_dir)
    param_dtype = _param_dtype(dtype or spec.torch_dtype, f"{hf_dir}/config.json torch_dtype")
    check_hf_input(spec, hf_dir)
    init_distributed(tp, pp, cp)
    model = build_model(spec, dtype=param_dtype)
    _on_every_rank(lambda: load_hf_weights(model, spec, hf_dir))
    return save_checkpoint(out_dir, [model], hf_dir=hf_dir, overwrite=overwrite)


def mcore_to_hf(mcore_dir: str, out_dir: str, *, tp: int = 1, pp: int = 1, cp: int = 1,
                dtype: str | None = None, max_shard_bytes: int = 5 * 1024 ** 3,
                overwrite: bool = False) -> str:
    """Load the Megatron checkpoint at the layout and stream it out as sharded safetensors.

    Every rank takes part in gathering each tensor; rank 0 alone writes. Output dtype: `dtype`,
    else the `torch_dtype` of the stored config.json.
    """
    from megatron_rlvr.checkpoint import load_checkpoint, read_info
    from megatron_rlvr.models.builder import build_model
    from megatron_rlvr.parallel import init_distributed

    safety.check_input_path(mcore_dir, "--mcore-dir")
    safety.check_output_dir(out_dir, flag="--out-dir", inputs=[("--mcore-dir", mcore_dir)],
                            overwrite=overwrite)
    _check_layout_fits(tp, pp)
    info = read_info(mcore_dir)
    spec = info["spec"]
    out_name = dtype or spec.torch_dtype
    if out_name not in DTYPES:
        raise ValueError(f"cannot export in dtype {out_name!r}; pass --dtype with one of "
                         f"{', '.join(DTYPES)}")
    init_distributed(tp, pp, cp)
    model = build_model(spec, dtype=_param_dtype(info["params_dtype"], mcore_dir))
    load_checkpoint(mcore_dir, [model], spec=spec)
    return write_hf(model, spec, info["hf_dir"], out_dir, dtype=out_name,
                    max_shard_bytes=max_shard_bytes)


def run_dry_run(hf_config: str, layouts: list[tuple[int, int]]) -> bool:
    from checkpoint_tools.dry_run import dry_run, format_report
    from megatron_rlvr.models.spec import read_model_spec

    spec = read_model_spec(hf_config)  # clear errors for a missing file, bad JSON, unknown model
    path = os.path.join(hf_config, "config.json") if os.path.isdir(hf_config) else hf_config
    with open(path) as f:
        config = json.load(f)
    ok = True
    for tp, pp in layouts:
        rep = dry_run(spec, config, tp, pp)
        print(format_report(spec, rep), flush=True)
        ok &= rep.ok
    return ok


def _parser() -> argparse.ArgumentParser:
    p = safety.OneLineParser(prog="python -m checkpoint_tools.convert", description=__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def layout(q, help_suffix=""):
        q.add_argument("--tp", type=safety.positive_int, default=1,
                       help="tensor-parallel size" + help_suffix)
        q.add_argument("--pp", type=safety.positive_int, default=1,
                       help="pipeline-parallel size" + help_suffix)

    a = sub.add_parser("hf-to-mcore", help="Hugging Face safetensors -> Megatron checkpoint",
                       description="Convert an HF checkpoint directory (config.json, safetensors, "
                       "tokenizer) into a Megatron checkpoint that loads at any layout.")
    a.add_argument("--hf-dir", required=True, help="Hugging Face checkpoint directory")
    a.add_argument("--out-dir", required=True, help="Megatron checkpoint directory to create")
    a.add_argument("--dtype", choices=PARAM_DTYPES, default=None,
                   help="parameter dtype (default: the config's torch_dtype)")
    layout(a, " used for the conversion (torchrun processes = tp x pp)")
    a.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out-dir that megatron-rlvr wrote")

    b = sub.add_parser("mcore-to-hf", help="Megatron checkpoint -> Hugging Face safetensors",
                       description="Export a Megatron checkpoint (converted or saved by the "
                       "trainer) as sharded safetensors with index, config and tokenizer files.")
    b.add_argument("--mcore-dir", required=True, help="Megatron checkpoint directory")
    b.add_argument("--out-dir", required=True, help="Hugging Face directory to create")
    b.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="output dtype (default: the torch_dtype of the stored config.json)")
    b.add_argument("--max-shard-gib", type=safety.positive_float, default=5.0,
                   help="largest safetensors file, GiB (default 5)")
    layout(b, " used for the export (torchrun processes = tp x pp)")
    b.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out-dir that megatron-rlvr wrote")

    c = sub.add_parser("dry-run", help="check the mapping on a real config, no weights allocated",
                       description="Produce every HF tensor name and shape through our mapping at "
                       "a TP x PP layout on the meta device, compare with transformers' model for "
                       "the config, and print per-rank parameter counts.")
    c.add_argument("--hf-config", required=True, help="config.json file (or its directory)")
    c.add_argument("--tp", type=safety.positive_int, nargs="+", default=[8],
                   help="tensor-parallel size(s)")
    c.add_argument("--pp", type=safety.positive_int, nargs="+", default=[4],
                   help="pipeline-parallel size(s)")
    return p


def _run(args) -> int:
    if args.command == "dry-run":
        layouts = [(t, p) for t in args.tp for p in args.pp]
        return 0 if run_dry_run(args.hf_config, layouts) else 1
    from megatron_rlvr.parallel import destroy_distributed
    try:
        if args.command == "hf-to-mcore":
            out = hf_to_mcore(args.hf_dir, args.out_dir, tp=args.tp, pp=args.pp,
                              dtype=args.dtype, overwrite=args.overwrite)
        else:
            out = mcore_to_hf(args.mcore_dir, args.out_dir, tp=args.tp, pp=args.pp,
                              dtype=args.dtype, overwrite=args.overwrite,
                              max_shard_bytes=int(args.max_shard_gib * 1024 ** 3))
    finally:
        destroy_distributed()
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"convert: wrote {out}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """A user's mistake (bad flag, path, checkpoint or config) is one `convert: error:` line
    and exit code 2; MEGATRON_RLVR_DEBUG=1 shows the traceback."""
    return safety.run_cli("convert", _run, _parser().parse_args(argv))


if __name__ == "__main__":  # the checkpoint save re-imports this module in a helper process
    from megatron_rlvr.fast_exit import exit_now
    exit_now(main())  # the exit code of main(), without the interpreter's teardown
