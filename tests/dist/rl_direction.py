"""Run under torchrun: one small DAPO step moves the policy the way its objective says, through the
whole update path (entropy op, token selection, loss, Megatron DDP, distributed optimizer).

From the same starting weights (a fresh policy each time), one step with:
  rho = 1:               the policy-gradient objective sum(A * log p(response)) rises;
  rho = 0.2, top:        it rises, and the top-20% highest-entropy response tokens (found here with
                         torch.topk on the starting policy's entropies) move more, per token, in the
                         direction of their advantage than the other response tokens do: the
                         gradient reached them directly, the others only through shared weights;
  rho = 0.2, bottom:     the control: the tokens outside that top 20% move more. A selection that
                         kept the wrong tokens fails one of the two.
With Adam the step is sign-based, so single sequences may move against their advantage; the
advantage-weighted sums must not.

    torchrun --nproc_per_node=N tests/dist/rl_direction.py --tp T HF_DIR
"""
import argparse
import math
from functools import partial

import torch

from megatron_rlvr import platform
from megatron_rlvr.algos.high_entropy import LossSettings, dapo_loss, token_stats
from megatron_rlvr.models.spec import read_model_spec
from megatron_rlvr.parallel import destroy_distributed, init_distributed
from megatron_rlvr.policy import OptimConfig, Policy
from megatron_rlvr.fast_exit import exit_now


def one_step(spec, hf_dir, mb, mask, ratio, select):
    """Per-token log-probs and entropies before, and log-probs after, one step from the start."""
    policy = Policy(spec, hf_dir, dtype=torch.float32, optim=OptimConfig(lr=1e-5, weight_decay=0.0))
    settings = LossSettings(temperature=1.0, clip_ratio_low=0.2, clip_ratio_high=0.28,
                            clip_ratio_c=10.0, loss_agg_mode="token-mean", ratio=ratio,
                            scope="micro_batch", norm="kept_tokens", select=select)
    before = policy.forward([mb], partial(token_stats, s=settings))[0]
    step_mb = {**mb, "old_logprobs_local": before["logprobs"]}
    r = policy.train_step([step_mb], partial(dapo_loss, s=settings))
    assert not r.skipped and r.grad_norm > 0, r
    kept = sum(int(log["kept_count"]) for log in r.logs)
    assert kept == math.ceil(round((ratio if select == "top" else 1 - ratio) * int(mask.sum()), 6))
    after = policy.forward([mb], partial(token_stats, s=settings))[0]
    return before["logprobs"], before["entropy"], after["logprobs"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("hf_dir")
    args = p.parse_args()
    init_distributed(args.tp, 1, 1)
    spec = read_model_spec(args.hf_dir)
    gen = torch.Generator().manual_seed(0)
    n, s, prompt = 4, 24, 8
    dev = platform.device()  # the batch lives where the model does
    ids = torch.randint(1, spec.vocab_size, (n, s), generator=gen).to(dev)
    mask = torch.zeros(n, s, dtype=torch.bool, device=dev)
    mask[:, prompt - 1:s - 1] = True
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0], device=dev)[:, None].expand(n, s).contiguous()
    mb = {"input_ids": ids, "labels": torch.roll(ids, -1, 1), "response_mask": mask,
          "advantages": adv}

    top = None
    for ratio, select in ((1.0, "top"), (0.2, "top"), (0.2, "bottom")):
        logp0, ent0, logp1 = one_step(spec, args.hf_dir, mb, mask, ratio, select)
        moved = (logp1 - logp0) * adv  # > 0: towards the advantage
        objective = moved[mask].sum().item()
        assert objective > 0, f"rho={ratio} {select}: the step lowered sum(A * log p)"
        if top is None or ratio < 1.0:
            k = math.ceil(0.2 * int(mask.sum()))
            idx = ent0.double().masked_fill(~mask, -math.inf).reshape(-1).topk(k).indices
            top = torch.zeros(mask.numel(), dtype=torch.bool, device=dev)
            top[idx] = True
            top = top.view(mask.shape)
        rest = mask & ~top
        top_move, rest_move = moved[top].mean().item(), moved[rest].mean().item()
        if ratio < 1.0:
            trained, other = (top_move, rest_move) if select == "top" else (rest_move, top_move)
            assert trained > other, \
                f"rho={ratio} {select}: the trained tokens moved {trained:.3g} per token, " \
                f"the others {other:.3g}"
        if torch.distributed.get_rank() == 0:
            print(f"ok rho={ratio} {select}: sum A*dlogp {objective:.4g}; per token: top-20% "
                  f"{top_move:.3g}, rest {rest_move:.3g}", flush=True)
    destroy_distributed()


if __name__ == "__main__":
    main()
    exit_now(0)  # skip the interpreter's teardown (megatron_rlvr/fast_exit.py)
