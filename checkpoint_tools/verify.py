"""Check that our Megatron model computes what the Hugging Face model computes.

    torchrun --nproc_per_node=4 -m checkpoint_tools.verify --hf-dir DIR --tp 2 --pp 2

Loads the HF model with transformers and our Megatron model (any TP/PP/CP/DP layout) with the same
weights, runs the same token batch through both and compares the logits and the per-token log-probs
of the next tokens. The last line is

    verify: logits max_abs_diff=<x> logprobs max_abs_diff=<y> tol=<t> PASS

or FAIL (exit code 1). Run it before trusting a conversion or a new layout.
"""
from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

DEFAULT_TOL = {"float32": 1e-4, "bfloat16": 5e-2}


def parse_args(argv=None):
    from megatron_rlvr.safety import OneLineParser, positive_float, positive_int

    p = OneLineParser(prog="python -m checkpoint_tools.verify", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-dir", required=True, help="Hugging Face checkpoint directory")
    p.add_argument("--tp", type=positive_int, default=1, help="tensor-parallel size")
    p.add_argument("--pp", type=positive_int, default=1, help="pipeline-parallel size")
    p.add_argument("--cp", type=positive_int, default=1, help="context-parallel size")
    p.add_argument("--dtype", choices=sorted(DEFAULT_TOL), default="float32",
                   help="Megatron parameter dtype (the HF reference runs in float32)")
    p.add_argument("--batch-size", type=positive_int, default=4,
                   help="sequences in the test batch")
    p.add_argument("--seq-len", type=positive_int, default=64,
                   help="tokens per sequence (a multiple of 2·cp)")
    p.add_argument("--tol", type=positive_float, default=None,
                   help="max abs difference allowed (default 1e-4 float32, 5e-2 bfloat16)")
    p.add_argument("--seed", type=int, default=1234)
    return p.parse_args(argv)


def _reference(hf_dir: str, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()


def next_token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token_{t+1} | ..t) for every position but the last, in float64."""
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    return logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron.core import parallel_state

    from megatron_rlvr import platform
    from megatron_rlvr.models.builder import DTYPES, build_model
    from megatron_rlvr.models.convert import load_hf_weights
    from megatron_rlvr.models.pipeline import cp_gather, gather_vocab, run_micro_batches
    from megatron_rlvr.models.spec import read_model_spec
    from megatron_rlvr.parallel import destroy_distributed, init_distributed

    from megatron_rlvr.safety import check_input_path

    check_input_path(args.hf_dir, "--hf-dir")
    spec = read_model_spec(args.hf_dir)
    if args.seq_len % (2 * args.cp):
        raise ValueError(f"--seq-len {args.seq_len} must be a multiple of 2·cp={2 * args.cp}")
    init_distributed(args.tp, args.pp, args.cp, seed=args.seed)
    dtype = DTYPES[args.dtype]
    tol = args.tol if args.tol is not None else DEFAULT_TOL[args.dtype]

    model = build_model(spec, dtype=dtype)
    load_hf_weights(model, spec, args.hf_dir)
    model.eval()

    gen = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(0, spec.vocab_size, (args.batch_size, args.seq_len), generator=gen)
    device_tokens = tokens.to(platform.device())  # the model's input; the reference's stays here

    def keep_logits(mb, logits):
        return logits.float()

    with torch.no_grad():
        out = run_micro_batches([model], [{"input_ids": device_tokens}], keep_logits,
                                vocab_size=spec.vocab_size, forward_only=True)
    # The check runs on one rank of the last pipeline stage; the others learn the verdict.
    result = [None]
    if parallel_state.is_pipeline_last_stage():
        logits = cp_gather(gather_vocab(out[0], spec.vocab_size), dim=1).cpu()
        checker = (parallel_state.get_tensor_model_parallel_rank() == 0
                   and parallel_state.get_context_parallel_rank() == 0
                   and parallel_state.get_data_parallel_rank() == 0)
        if checker:
            ref = _reference(args.hf_dir, tokens)
            d_logits = (logits.double() - ref.double()).abs().max().item()
            d_logp = (next_token_logprobs(logits, tokens)
                      - next_token_logprobs(ref, tokens)).abs().max().item()
            ok = d_logits <= tol and d_logp <= tol
            result = [f"verify: logits max_abs_diff={d_logits:.3e} logprobs "
                      f"max_abs_diff={d_logp:.3e} tol={tol:g} {'PASS' if ok else 'FAIL'}"]
    # Megatron orders ranks tp-fastest, then cp, dp, with pp slowest: the last stage's first rank.
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    checker_rank = (pp - 1) * (dist.get_world_size() // pp)
    dist.broadcast_object_list(result, src=checker_rank)
    line = result[0]
    if dist.get_rank() == 0:
        print(f"verify: {spec.architecture} layout tp={args.tp} pp={args.pp} cp={args.cp} "
              f"dp={parallel_state.get_data_parallel_world_size()} dtype={args.dtype}")
        print(line, flush=True)
    destroy_distributed()
    return 0 if line.endswith("PASS") else 1


def cli(argv=None) -> int:
    """`main` with the user's mistakes (bad path, unsupported model, impossible layout) reported
    as one line instead of a traceback."""
    from megatron_rlvr.safety import run_cli

    return run_cli("verify", main, argv)


if __name__ == "__main__":
    from megatron_rlvr.fast_exit import exit_now
    exit_now(cli())  # the exit code of cli(), without the interpreter's teardown
