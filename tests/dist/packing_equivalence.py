"""Run under torchrun: packed micro-batches train exactly as padded ones.

One RL update (old pass, selection, one optimizer step over a mini-batch of 16 sequences of varied
lengths) is run from the same initial weights in three layouts:
  padded        every sequence right-padded to the longest, `micro_batch_size` sequences per
                micro-batch, contiguous data-parallel shares (the baseline);
  packed        the same micro-batches, sequences concatenated (THD, cu_seqlens);
  packed-budget token-budget micro-batches balanced over data-parallel ranks (partition.py), so
                micro-batches hold different sequences than the baseline's.
For entropy_top_scope global and micro_batch, ρ = 0.2 and 1.0 (packed-budget only where the
objective does not depend on which sequences share a micro-batch: global scope, or ρ = 1), the
loss, the gradient norm, the selection counts and the PPO metrics, and every weight after the step
(gathered as full HF tensors) must equal the padded run's to 1e-6. Where the selection needs no
entropies before the update (micro_batch scope, or ρ = 1), a packed update without an old pass
(the trainer's on-policy shortcut) must equal one with an exact old pass.

The optimizer is Adam with eps = 1e-3: its first step is then lr·g/(|g| + eps), Lipschitz in the
gradient, so equal weights mean equal gradients (with eps = 1e-8 a gradient of ±1e-12 noise would
move a weight by ±lr).

    torchrun --nproc_per_node=4 tests/dist/packing_equivalence.py --tp 2 --cp 2 --sp HF_DIR
    torchrun --nproc_per_node=4 tests/dist/packing_equivalence.py --pp 2 HF_DIR   (PP2 x DP2)
    torchrun --nproc_per_node=4 tests/dist/packing_equivalence.py --layouts 2x1x2,1x2x1 HF_DIR

--layouts (TPxPPxCP, comma-separated) checks several layouts in turn in one launch, the parallel
groups re-formed between them; each layout's lines and assertion messages start with its tag,
`[tp2 pp1 cp2]`.
"""
import argparse
from functools import partial

import torch
import torch.distributed as dist

from megatron_rlvr import platform
from megatron_rlvr.algos.high_entropy import LossSettings, dapo_loss, select_mini_batch, token_stats
from megatron_rlvr.batch import build_batch, micro_batches, pack, sequences_of
from megatron_rlvr.generation import Group
from megatron_rlvr.models.pipeline import local_tokens, sequence_length_multiple
from megatron_rlvr.models.spec import read_model_spec
from megatron_rlvr.parallel import destroy_distributed, init_distributed
from megatron_rlvr.partition import fixed_plan, padded_length, token_budget_plan
from megatron_rlvr.policy import OptimConfig, Policy
from megatron_rlvr.fast_exit import exit_now

MICRO_BATCH = 4
SEED = 27  # the entropy gap at the top-20% threshold is 1.9e-4 (see threshold_gap)
BUDGET = 96


def make_groups(vocab: int) -> list[Group]:
    """4 prompts x 4 responses, lengths 1..37; 'rollout log-probs' hold per-token noise that the
    test adds to the old log-probs, so importance ratios spread over both clip bounds."""
    g = torch.Generator().manual_seed(SEED)
    groups = []
    for i in range(4):
        prompt = torch.randint(1, vocab, (3 + 2 * i,), generator=g).tolist()
        lengths = [[37, 2, 11, 20], [5, 29, 1, 14], [8, 8, 33, 3], [17, 26, 6, 12]][i]
        responses = [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]
        noise = [((torch.rand(n, generator=g) - 0.5) * 0.8).tolist() for n in lengths]
        rewards = [[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 1.0, 0.5], [1.0, 1.0, 0.0, 0.0],
                   [0.2, 0.9, 0.0, 1.0]][i]
        groups.append(Group(prompt_index=i, data_source="t", ground_truth="0", prompt_ids=prompt,
                            responses=responses, rollout_logprobs=noise,
                            finish_reasons=["stop"] * 4, accuracy=rewards, reward=rewards))
    return groups


def layouts(groups, multiple, dp, dp_rank, hidden):
    seqs = sequences_of(groups)
    padded = micro_batches(build_batch(groups, pad_id=0, length_multiple=multiple), 0, len(seqs),
                           dp_rank=dp_rank, dp=dp, micro_batch_size=MICRO_BATCH)
    plan = fixed_plan(len(seqs), dp=dp, micro_batch_size=MICRO_BATCH)[dp_rank]
    packed = [pack([seqs[i] for i in mb], length_multiple=multiple) for mb in plan]
    lengths = [padded_length(len(q), multiple) for q in seqs]
    budget = token_budget_plan(lengths, dp=dp, max_tokens=BUDGET, hidden_size=hidden)[dp_rank]
    packed_budget = [pack([seqs[i] for i in mb], length_multiple=multiple) for mb in budget]
    return {"padded": padded, "packed": packed, "packed-budget": packed_budget}


def batch_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the ranks holding distinct tokens (last stage, TP rank 0), known everywhere."""
    from megatron.core import parallel_state as ps
    owner = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
    x = x.double() if owner else torch.zeros_like(x, dtype=torch.float64)
    dist.all_reduce(x)
    return x


def threshold_gap(mbs, outs):
    """The selection must not hinge on rounding: the lowest kept entropy must exceed the highest
    dropped one by far more than the layouts' float32 differences (~1e-6). (The first response
    token of a group's responses has the same entropy in all of them: exact ties, broken by
    position, which differs between layouts.)"""
    from megatron.core import parallel_state as ps
    dev = platform.device()
    lo = torch.tensor([float("inf")], device=dev)
    hi = torch.tensor([float("-inf")], device=dev)
    if ps.is_pipeline_last_stage():
        for mb, out in zip(mbs, outs):
            resp, keep = local_tokens(mb, mb["response_mask"]), mb["keep_local"]
            if keep.any():
                lo = torch.minimum(lo, out["entropy"][keep].min().reshape(1))
            if (resp & ~keep).any():
                hi = torch.maximum(hi, out["entropy"][resp & ~keep].max().reshape(1))
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    assert (lo - hi).item() > 2e-5, ("entropy tie at the threshold: change the data",
                                     lo.item(), hi.item())


def run(args, spec, mbs, s: LossSettings, old_pass: str = "noisy") -> dict:
    """old_pass: "noisy" = old log-probs from a forward pass plus per-token noise (ratios cross
    the clip bounds); "exact" = from a forward pass; "skip" = none: the loss takes its own
    detached log-probs (the trainer's on-policy shortcut)."""
    policy = Policy(spec, args.hf_dir, dtype=torch.float32, sequence_parallel=args.sp,
                    optim=OptimConfig(lr=1e-3, weight_decay=0.0, adam_eps=1e-3, grad_clip=1e6))
    from megatron.core import parallel_state as ps
    if old_pass != "skip":
        outs = policy.forward(mbs, partial(token_stats, s=s))
        for mb, out in zip(mbs, outs):
            noise = local_tokens(mb, mb["rollout_logprobs"]) if old_pass == "noisy" else 0.0
            mb["old_logprobs_local"] = out["logprobs"] + noise
        select_mini_batch(policy, mbs, s, None, entropies=[o["entropy"] for o in outs])
        if s.scope == "global" and s.ratio < 1:
            threshold_gap(mbs, outs)
    result = policy.train_step(mbs, partial(dapo_loss, s=s))
    names = ("kept_count", "response_count", "tokens_count", "clip_high_count", "clip_low_count",
             "dual_clip_count", "ratio_sum", "approx_kl_sum")
    dev = platform.device()
    sums = torch.zeros(len(names), dtype=torch.float64, device=dev)
    for log in result.logs:
        sums += torch.stack([torch.as_tensor(log[k], device=dev).double() for k in names])
    sums = batch_sum(sums)
    tokens = torch.tensor([float(sum(mb["input_ids"].numel() for mb in mbs))], device=dev)
    dist.all_reduce(tokens, group=ps.get_data_parallel_group())  # tokens through the model
    weights = {k: v.detach().clone() for k, v in policy.hf_weights()}
    for mb in mbs:  # the next run starts clean
        mb.pop("old_logprobs_local", None)
        mb.pop("keep_local", None)
    return {"loss": result.loss, "grad_norm": result.grad_norm, "skipped": result.skipped,
            "metrics": dict(zip(names, sums.tolist())), "tokens": tokens.item(),
            "weights": weights}


def compare(name, ref, got, rank):
    name = TAG + name
    assert not ref["skipped"] and not got["skipped"], name
    assert abs(ref["loss"] - got["loss"]) <= 1e-6, (name, ref["loss"], got["loss"])
    assert abs(ref["grad_norm"] - got["grad_norm"]) <= 1e-6 * max(1.0, ref["grad_norm"]), \
        (name, ref["grad_norm"], got["grad_norm"])
    for k, v in ref["metrics"].items():
        assert abs(v - got["metrics"][k]) <= 1e-6 * max(1.0, abs(v)), (name, k, v, got["metrics"][k])
    worst = max((ref["weights"][k] - got["weights"][k]).abs().max().item() for k in ref["weights"])
    moved = max((ref["weights"][k] - INITIAL[k]).abs().max().item() for k in ref["weights"])
    assert worst <= 1e-6, (name, worst)
    assert moved > 1e-4, (name, "the step did not move the weights", moved)
    if rank == 0:
        print(f"{TAG}ok {name[len(TAG):]}: loss {got['loss']:.6f} (reference {ref['loss']:.6f}), "
              f"weights within {worst:.1e} (step moved them {moved:.1e}), tokens "
              f"{got['tokens']:.0f} vs reference {ref['tokens']:.0f}", flush=True)


INITIAL: dict = {}
TAG = ""  # the layout being checked, "[tp2 pp1 cp2] ": prefixes its lines and messages


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--cp", type=int, default=1)
    p.add_argument("--sp", action="store_true")
    p.add_argument("--layouts", help="TPxPPxCP,...: these layouts in turn (not --tp/--pp/--cp)")
    p.add_argument("hf_dir")
    args = p.parse_args()
    global TAG
    for layout in (args.layouts or f"{args.tp}x{args.pp}x{args.cp}").split(","):
        args.tp, args.pp, args.cp = (int(x) for x in layout.split("x"))
        TAG = f"[tp{args.tp} pp{args.pp} cp{args.cp}] "
        check_layout(args)
    destroy_distributed()


def check_layout(args):
    init_distributed(args.tp, args.pp, args.cp)
    from megatron.core import parallel_state as ps

    rank = dist.get_rank()
    spec = read_model_spec(args.hf_dir)
    multiple = sequence_length_multiple(tp=args.tp, cp=args.cp, sequence_parallel=args.sp)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    INITIAL.clear()
    INITIAL.update({k: v.detach().clone() for k, v in Policy(
        spec, args.hf_dir, dtype=torch.float32, sequence_parallel=args.sp,
        optim=OptimConfig()).hf_weights()})
    groups = make_groups(spec.vocab_size)
    for scope in ("global", "micro_batch"):
        for ratio in (0.2, 1.0):
            s = LossSettings(temperature=0.7, clip_ratio_low=0.2, clip_ratio_high=0.28,
                             clip_ratio_c=3.0, loss_agg_mode="token-mean", ratio=ratio,
                             scope=scope, norm="kept_tokens", select="top")
            mbs = layouts(groups, multiple, dp, dp_rank, spec.hidden_size)
            ref = run(args, spec, mbs["padded"], s)
            names = ["packed"] + (["packed-budget"] if scope == "global" or ratio >= 1 else [])
            for name in names:
                compare(f"{name} scope={scope} rho={ratio}", ref, run(args, spec, mbs[name], s),
                        rank)
            if scope == "micro_batch" or ratio >= 1:
                # No old pass (one on-policy update): the same step as with an exact old pass.
                exact = run(args, spec, mbs["packed"], s, old_pass="exact")
                compare(f"packed without old pass scope={scope} rho={ratio}", exact,
                        run(args, spec, mbs["packed"], s, old_pass="skip"), rank)
    dist.barrier()
    ps.destroy_model_parallel()  # the next layout forms its own groups


if __name__ == "__main__":
    main()
    exit_now(0)  # skip the interpreter's teardown (megatron_rlvr/fast_exit.py)
