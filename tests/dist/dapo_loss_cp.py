"""Run under torchrun on 2 processes: `dapo_loss` at context parallelism 2 equals the float64
re-derivation of tests/dapo_reference.py, for every branch (ρ, scope, norm, loss_agg_mode) with
top selection, and bottom / random selection in each scope (`cp_cases`).

Each rank holds its context-parallel half of every sequence (chunks r and 3 - r of 4, the
load-balanced split); the selection pools span both ranks (the micro-batch scope's top-k across
its context-parallel ranks, the global scope's over the data- and context-parallel group). As
Megatron does, the mini-batch loss is the all-reduced Σ numerators / Σ denominators and each
rank's gradient that of its numerators over the global denominator. Checked against the reference
computed on the whole (gathered) sequences: the loss, the gradient w.r.t. every logit (gathered),
kept counts per micro-batch and the lowest kept entropy. Random selection: each rank draws from its
own generator (seeded by its context-parallel rank, as the trainer does); the reference is the
top-k of the gathered draws.

    torchrun --nproc_per_node=2 tests/dist/dapo_loss_cp.py

`check_context_parallel()` is also called by tests/dist/loss_formula.py to share its launch.
"""
import torch
import torch.distributed as dist

from dapo_reference import (MBS, N, S, EPS_HIGH, EPS_LOW, C, T, cp_cases, make_inputs,
                            reference_keep, reference_loss, reference_stats)
from megatron_rlvr import platform
from megatron_rlvr.fast_exit import exit_now

CP = 2
SEED = 7


def local_cols(rank: int) -> torch.Tensor:
    """Positions of this rank's tokens in the full sequence: chunks rank and 2·CP-1-rank."""
    w = S // (2 * CP)
    return torch.cat([torch.arange(rank * w, (rank + 1) * w),
                      torch.arange((2 * CP - 1 - rank) * w, (2 * CP - rank) * w)])


def gather_full(x: torch.Tensor, group) -> torch.Tensor:
    """Every rank's [B, S/CP, ...] part back at its positions [B, S, ...], on the host."""
    parts = [torch.empty_like(x) for _ in range(CP)]
    dist.all_gather(parts, x.contiguous(), group=group)
    full = torch.empty(x.shape[0], S, *x.shape[2:], dtype=x.dtype)
    for r, part in enumerate(parts):
        full[:, local_cols(r)] = part.cpu()
    return full


def check_context_parallel() -> int:
    """Every case of cp_cases() at CP2; returns the number checked. Needs the parallel groups
    initialised as TP1×PP1×CP2×DP1."""
    from megatron.core import parallel_state as ps

    from megatron_rlvr.algos.high_entropy import (LossSettings, dapo_loss, select_mini_batch,
                                                  token_stats)

    assert ps.get_context_parallel_world_size() == CP and dist.get_world_size() == CP
    group, rank = ps.get_context_parallel_group(), ps.get_context_parallel_rank()
    dev = platform.device()
    inp = make_inputs(0)
    cols = local_cols(rank)
    _, ent = reference_stats(inp["logits"], inp["labels"])
    rows = [slice(j, j + MBS) for j in range(0, N, MBS)]
    checked = 0
    for ratio, scope, norm, select, mode in cp_cases():
        s = LossSettings(temperature=T, clip_ratio_low=EPS_LOW, clip_ratio_high=EPS_HIGH,
                         clip_ratio_c=C, loss_agg_mode=mode, ratio=ratio, scope=scope, norm=norm,
                         select=select)
        # The trainer's inputs: full-length labels/masks/advantages (dapo_loss slices them), this
        # rank's old log-probs and logits.
        mbs = [{"labels": inp["labels"][r].to(dev),
                "response_mask": inp["response_mask"][r].to(dev),
                "advantages": inp["advantages"][r].to(dev),
                "old_logprobs_local": inp["old_logprobs"][r][:, cols].to(dev),
                "rollout_logprobs": inp["rollout_logprobs"][r].to(dev)} for r in rows]
        leaves = [inp["logits"][r][:, cols].to(dev).requires_grad_() for r in rows]
        gen = platform.generator(SEED + rank)
        ents = [token_stats(mb, x.detach(), s)["entropy"] for mb, x in zip(mbs, leaves)]
        select_mini_batch(None, mbs, s, gen, entropies=ents)
        outs = [dapo_loss(mb, x, s, generator=gen) for mb, x in zip(mbs, leaves)]
        totals = torch.stack([sum(o[0] for o in outs).detach().double(),
                              sum(o[1] for o in outs).double()])
        dist.all_reduce(totals, group=group)
        (sum(o[0] for o in outs) / totals[1].clamp(min=1)).backward()
        got = (totals[0] / totals[1].clamp(min=1)).item()
        grad = gather_full(torch.cat([x.grad for x in leaves]), group)

        noise = None
        if select == "random":  # this rank's draws, replayed from its seed, then gathered
            g = torch.Generator().manual_seed(SEED + rank)
            if scope == "global":
                local = torch.rand(N * S // CP, generator=g).view(N, S // CP)
                noise = [gather_full(local.to(dev), group)]
            else:
                noise = [gather_full(torch.rand(MBS, S // CP, generator=g).to(dev), group)
                         for _ in rows]
        keep = reference_keep(inp, ratio, scope, select, noise)
        logits = inp["logits"].double().requires_grad_()
        want = reference_loss(logits, inp, keep, ratio, scope, norm, mode)
        want.backward()
        case = f"rho={ratio} {scope} {norm} {select} {mode}"
        assert abs(got - want.item()) <= 1e-5 * abs(want.item()) + 1e-6, f"{case}: {got} != {want}"
        scale = logits.grad.abs().max()
        assert torch.allclose(grad.double(), logits.grad, rtol=1e-4, atol=1e-6 * scale), \
            f"{case}: gradient off by {(grad.double() - logits.grad).abs().max()}"
        for j, log in enumerate(outs):
            counts = torch.stack([log[2]["kept_count"], log[2]["response_count"]]).long()
            dist.all_reduce(counts, group=group)
            # .to(dev): the loss's new_tensor(inf) (nothing kept) is a host tensor in strict mode
            lowest = log[2]["kept_entropy_min"].detach().reshape(1).to(dev)
            dist.all_reduce(lowest, op=dist.ReduceOp.MIN, group=group)
            k_ref = keep[rows[j]]
            want_counts = [int(k_ref.sum()), int(inp["response_mask"][rows[j]].sum())]
            assert counts.tolist() == want_counts, case
            if k_ref.any():
                want_min = ent[rows[j]][k_ref].min().item()
                assert abs(lowest.item() - want_min) <= 1e-5 * want_min, (case, lowest, want_min)
        if scope == "global" and ratio < 1.0:
            chosen = gather_full(torch.cat([mb["keep_local"] for mb in mbs]), group)
            assert torch.equal(chosen, keep), case
        checked += 1
        if dist.get_rank() == 0:
            print(f"ok cp=2 {case}: {got:.6f} = {want.item():.6f}", flush=True)
    return checked


def main():
    from megatron_rlvr.parallel import destroy_distributed, init_distributed

    init_distributed(1, 1, CP)
    assert check_context_parallel() == len(cp_cases())
    destroy_distributed()


if __name__ == "__main__":
    main()
    exit_now(0)  # skip the interpreter's teardown (megatron_rlvr/fast_exit.py)
