"""Run under torchrun: one small DAPO step improves the policy-gradient objective Σ A·log p(response)
(the sign and plumbing of the whole update path: entropy op, token selection, loss, Megatron DDP,
distributed optimizer). With Adam the step is sign-based, so single sequences may move against
their advantage; the advantage-weighted sum must rise.

    torchrun --nproc_per_node=N tests/dist/rl_direction.py --tp T [--scope S] [--ratio R] HF_DIR
"""
import argparse
from functools import partial

import torch

from megatron_rlvr import platform
from megatron_rlvr.algos.high_entropy import LossSettings, dapo_loss, token_stats
from megatron_rlvr.models.pipeline import cp_slice
from megatron_rlvr.models.spec import read_model_spec
from megatron_rlvr.parallel import destroy_distributed, init_distributed
from megatron_rlvr.policy import OptimConfig, Policy


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--ratio", type=float, default=1.0)
    p.add_argument("hf_dir")
    args = p.parse_args()
    init_distributed(args.tp, 1, 1)
    spec = read_model_spec(args.hf_dir)
    policy = Policy(spec, args.hf_dir, dtype=torch.float32,
                    optim=OptimConfig(lr=1e-5, weight_decay=0.0))
    gen = torch.Generator().manual_seed(0)
    n, s, prompt = 4, 24, 8
    dev = platform.device()  # the batch lives where the model does
    ids = torch.randint(1, spec.vocab_size, (n, s), generator=gen).to(dev)
    mask = torch.zeros(n, s, dtype=torch.bool, device=dev)
    mask[:, prompt - 1:s - 1] = True
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0], device=dev)[:, None].expand(n, s).contiguous()
    mb = {"input_ids": ids, "labels": torch.roll(ids, -1, 1), "response_mask": mask,
          "advantages": adv}
    settings = LossSettings(temperature=1.0, clip_ratio_low=0.2, clip_ratio_high=0.28,
                            clip_ratio_c=10.0, loss_agg_mode="token-mean", ratio=args.ratio,
                            scope="micro_batch", norm="kept_tokens", select="top")

    def seq_logprob():
        out = policy.forward([mb], partial(token_stats, s=settings))[0]
        return (out["logprobs"] * cp_slice(mask)).sum(-1)

    before = seq_logprob()
    mb["old_logprobs_local"] = policy.forward([mb], partial(token_stats, s=settings))[0]["logprobs"]
    for _ in range(1):
        r = policy.train_step([mb], partial(dapo_loss, s=settings))
        assert not r.skipped
    after = seq_logprob()
    delta = after - before
    print("delta", delta.tolist(), flush=True)
    objective = (delta * adv[:, 0]).sum().item()
    assert objective > 0, f"the step lowered sum(A * log p): {delta.tolist()}"
    destroy_distributed()


if __name__ == "__main__":
    main()
