"""Run under torchrun: one mini-batch's loss through the trainer's path equals the formula by hand.

The path under test is the trainer's: `batch.micro_batches` (this rank's share, on the device),
`select_mini_batch` (the global scope's selection), `Policy.train_step` with `dapo_loss` (Megatron's
schedule, per-token loss accounting across micro-batches and data-parallel ranks). The reference is
independent of it: full-vocabulary logits gathered from the tensor-parallel shards, log-probs and
entropies in float64 (not the fused op), `torch.topk` for the selection, and the clip-higher,
dual-clip PPO loss written out below, gathered over the whole mini-batch. Checked for:
  rho = 1 (DAPO's token-mean over the mini-batch), in both scopes;
  rho = 0.2 global, kept-token and all-token normalisation (the paper);
  rho = 0.2 micro_batch (the seed code: each micro-batch's masked mean, weighted by its sequences);
each at micro-batch sizes 1 and 4. The learning rate is 0, so every call sees the same weights.
`--tp 2,1` checks TP2 (DP1) and then TP1 (DP2) in one launch, re-forming the parallel groups in
between; on 2 processes the launch ends with tests/dist/dapo_loss_cp.py's checks at CP2 (every
branch of dapo_loss at context parallelism 2 against a float64 reference).

    torchrun --nproc_per_node=2 tests/dist/loss_formula.py --tp 2,1 HF_DIR
"""
import argparse
import math
from functools import partial

import torch
import torch.distributed as dist

from megatron_rlvr import platform
from megatron_rlvr.algos.high_entropy import LossSettings, dapo_loss, select_mini_batch
from megatron_rlvr.batch import micro_batches
from megatron_rlvr.models.pipeline import gather_vocab
from megatron_rlvr.models.spec import read_model_spec
from megatron_rlvr.parallel import destroy_distributed, init_distributed
from megatron_rlvr.policy import OptimConfig, Policy
from megatron_rlvr.fast_exit import exit_now

N, S, T = 8, 24, 0.7
EPS_LOW, EPS_HIGH, C = 0.2, 0.28, 10.0


def make_batch(vocab: int) -> dict:
    """A mini-batch of N sequences with varied prompt and response lengths (host tensors)."""
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(1, vocab, (N, S), generator=g)
    response = torch.zeros(N, S, dtype=torch.bool)
    for i in range(N):
        p = 3 + i % 5
        r = [14, 4, 9, 16, 6, 11, 3, 13][i]
        response[i, p - 1:p - 1 + r] = True
        ids[i, p + r:] = 0  # pad
    adv = torch.tensor([1.2, -0.7, 0.4, -1.5, 0.9, -0.3, 1.1, -0.8])
    return {"input_ids": ids, "labels": torch.roll(ids, -1, 1), "response_mask": response,
            "advantages": adv[:, None].expand(N, S).contiguous(),
            # old log-probs = current - noise: ratios exp(noise) spread over both clip bounds
            "noise": (torch.rand(N, S, generator=g) - 0.5) * 0.8}


def gather_dp(x: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state as ps
    group = ps.get_data_parallel_group()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts)


def reference_stats(policy, mbs, vocab):
    """float64 log-probs and entropies from gathered full-vocabulary logits, whole mini-batch."""
    def full(mb, logits):
        z = gather_vocab(logits, vocab).double() / T
        logp_all = torch.log_softmax(z, -1)
        logp = logp_all.gather(-1, mb["labels"][..., None]).squeeze(-1)
        ent = -(logp_all.exp() * logp_all).sum(-1)
        return {"logp": logp, "ent": ent}

    outs = policy.forward(mbs, full)
    return (gather_dp(torch.cat([o["logp"] for o in outs])),
            gather_dp(torch.cat([o["ent"] for o in outs])))


def pg_loss(logp, old, adv):
    ratio = torch.exp(logp - old)
    loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - EPS_LOW, 1 + EPS_HIGH))
    return torch.where(adv < 0, torch.minimum(loss, -adv * C), loss)


def top_mask(ent, mask, ratio):
    k = math.ceil(ratio * int(mask.sum()))
    scores = torch.where(mask, ent, torch.tensor(-math.inf, dtype=ent.dtype, device=ent.device))
    values, idx = scores.reshape(-1).topk(k + 1)
    assert values[k - 1] - values[k] > 1e-5, "entropy tie at the threshold: change the seed"
    keep = torch.zeros(mask.numel(), dtype=torch.bool, device=mask.device)
    keep[idx[:k]] = True
    return keep.view(mask.shape)


def expected(pg, batch, ent, ratio, scope, norm, mbs):
    mask = batch["response_mask"]
    if ratio >= 1.0:
        return (pg * mask).sum() / mask.sum()
    if scope == "global":
        keep = top_mask(ent, mask, ratio)
        den = keep.sum() if norm == "kept_tokens" else mask.sum()
        return (pg * keep).sum() / den
    total = 0.0
    for j in range(0, N, mbs):  # the seed: mean within the micro-batch, weight n_mb / N
        m = mask[j:j + mbs]
        keep = top_mask(ent[j:j + mbs], m, ratio)
        den = keep.sum() if norm == "kept_tokens" else m.sum()
        total = total + (pg[j:j + mbs] * keep).sum() / den * (mbs / N)
    return total


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tp", default="1", help="tensor-parallel sizes to check, in turn: e.g. 2,1")
    p.add_argument("hf_dir")
    args = p.parse_args()
    for tp in (int(x) for x in args.tp.split(",")):
        # One launch checks several layouts: the parallel groups are re-formed between them.
        check_layout(tp, args.hf_dir)
    if dist.get_world_size() == 2:
        # Shares this launch: dapo_loss at context parallelism 2 (tests/dist/dapo_loss_cp.py).
        from dapo_loss_cp import check_context_parallel
        init_distributed(1, 1, 2)
        assert check_context_parallel() > 0
    destroy_distributed()


def check_layout(tp: int, hf_dir: str) -> None:
    init_distributed(tp, 1, 1)
    from megatron.core import parallel_state as ps

    dev = platform.device()
    spec = read_model_spec(hf_dir)
    policy = Policy(spec, hf_dir, dtype=torch.float32,
                    optim=OptimConfig(lr=0.0, weight_decay=0.0))
    host = make_batch(spec.vocab_size)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    checked = 0
    for mbs in (1, 4):
        batch_mbs = micro_batches(host, 0, N, dp_rank=dp_rank, dp=dp, micro_batch_size=mbs,
                                  device=dev)
        ref_logp, ref_ent = reference_stats(policy, batch_mbs, spec.vocab_size)
        full = {k: v.to(dev) for k, v in host.items()}
        old_full = ref_logp - full["noise"].double()
        pg = pg_loss(ref_logp, old_full, full["advantages"].double())
        # this rank's old log-probs: its rows of the gathered float64 reference
        rows = torch.arange(N, device=dev).view(dp, -1)[dp_rank]
        local_old = old_full[rows].float()
        for j, mb in enumerate(batch_mbs):
            mb["old_logprobs_local"] = local_old[j * mbs:(j + 1) * mbs]
        for ratio, scope, norm in ((1.0, "global", "kept_tokens"), (1.0, "micro_batch", "kept_tokens"),
                                   (0.2, "global", "kept_tokens"), (0.2, "global", "all_tokens"),
                                   (0.2, "micro_batch", "kept_tokens"),
                                   (0.2, "micro_batch", "all_tokens")):
            s = LossSettings(temperature=T, clip_ratio_low=EPS_LOW, clip_ratio_high=EPS_HIGH,
                             clip_ratio_c=C, loss_agg_mode="token-mean", ratio=ratio, scope=scope,
                             norm=norm, select="top")
            select_mini_batch(policy, batch_mbs, s, generator=None)
            got = policy.train_step(batch_mbs, partial(dapo_loss, s=s)).loss
            want = expected(pg, full, ref_ent, ratio, scope, norm, mbs).item()
            assert abs(got - want) < 2e-5 * max(1.0, abs(want)), \
                f"mbs={mbs} rho={ratio} {scope} {norm}: loss {got} != formula {want}"
            checked += 1
            if dist.get_rank() == 0:
                print(f"ok mbs={mbs} dp={dp} rho={ratio} {scope} {norm}: {got:.6f} = {want:.6f}",
                      flush=True)
    assert checked == 12
    random_masks_agree_across_tp(policy, host, dev)
    del policy
    ps.destroy_model_parallel()


def random_masks_agree_across_tp(policy, host, dev):
    """entropy_select=random: tensor-parallel peers hold the same tokens and must keep the same
    ones (else the vocab-parallel gradient mixes two losses); other data-parallel ranks differ."""
    from megatron.core import parallel_state as ps

    from megatron_rlvr.algos.high_entropy import choose_tokens
    from megatron_rlvr.trainer import selection_generator

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    mbs = micro_batches(host, 0, N, dp_rank=dp_rank, dp=dp, micro_batch_size=N // dp, device=dev)
    masks = []
    for scope in ("global", "micro_batch"):
        s = LossSettings(temperature=T, clip_ratio_low=EPS_LOW, clip_ratio_high=EPS_HIGH,
                         clip_ratio_c=C, loss_agg_mode="token-mean", ratio=0.2, scope=scope,
                         norm="kept_tokens", select="random")
        gen = selection_generator(7, 3, 1)
        if scope == "global":
            select_mini_batch(policy, mbs, s, gen)
            masks.append(mbs[0]["keep_local"])
        else:
            masks.append(choose_tokens(torch.rand(N // dp, S, device=dev), mbs[0]["response_mask"],
                                       s, None, gen))
    mine = torch.stack(masks).to(torch.uint8)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    tp = ps.get_tensor_model_parallel_world_size()
    for r, other in enumerate(everyone):  # ranks are TP-fastest: r // tp is the DP rank
        if r // tp == dist.get_rank() // tp:
            assert torch.equal(other, mine), f"rank {r} kept other random tokens than its TP peer"
    if dist.get_rank() == 0:
        print(f"ok random masks identical across {tp} tensor-parallel rank(s)", flush=True)


if __name__ == "__main__":
    main()
    exit_now(0)  # skip the interpreter's teardown (megatron_rlvr/fast_exit.py)
