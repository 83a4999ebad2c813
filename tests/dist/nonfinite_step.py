"""Run under torchrun: a non-finite loss, or a finite loss with a non-finite gradient, skips the
optimizer step and leaves every weight as it was; training goes on afterwards.

    torchrun --nproc_per_node=N tests/dist/nonfinite_step.py --tp T HF_DIR
"""
import argparse

import torch

from megatron_rlvr import platform
from megatron_rlvr.models.spec import read_model_spec
from megatron_rlvr.parallel import destroy_distributed, init_distributed
from megatron_rlvr.policy import OptimConfig, Policy


def weights(policy):
    return {n: p.detach().clone() for n, p in policy.model[0].named_parameters()}


def assert_unchanged(policy, before, what):
    for n, p in policy.model[0].named_parameters():
        assert torch.equal(p, before[n]), f"{n} changed by a skipped step ({what})"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("hf_dir")
    args = p.parse_args()
    init_distributed(args.tp, 1, 1)
    dev = platform.device()
    spec = read_model_spec(args.hf_dir)
    policy = Policy(spec, args.hf_dir, dtype=torch.float32, optim=OptimConfig(lr=1e-2))
    tokens = torch.randint(1, spec.vocab_size, (2, 16),
                           generator=torch.Generator().manual_seed(0)).to(dev)
    mbs = [{"input_ids": tokens}]

    def loss(poison=None):
        """Mean logit; poison="loss": a NaN loss; poison="grad": a finite loss whose gradient
        w.r.t. the logits is NaN (what a bf16 overflow in the backward looks like)."""
        def fn(mb, logits):
            if poison == "grad":
                logits.register_hook(lambda g: g * float("nan"))
            value = logits.float().mean() * (float("nan") if poison == "loss" else 1.0)
            den = torch.tensor(1, dtype=torch.int, device=dev)
            return value, den, {"numerator": value.detach(), "denominator": den}
        return fn

    before = weights(policy)
    result = policy.train_step(mbs, loss(poison="loss"))
    assert result.skipped and result.loss != result.loss, result
    assert_unchanged(policy, before, "NaN loss")

    result = policy.train_step(mbs, loss(poison="grad"))
    assert result.loss == result.loss and abs(result.loss) != float("inf"), \
        f"the loss should be finite: {result}"
    assert result.skipped, f"a NaN gradient with a finite loss was not skipped: {result}"
    assert result.grad_norm != result.grad_norm, result
    assert_unchanged(policy, before, "NaN gradient")

    result = policy.train_step(mbs, loss())  # and training goes on afterwards
    assert not result.skipped and result.grad_norm > 0, result
    assert all(p.isfinite().all() for p in policy.model[0].parameters()), "a non-finite weight"
    changed = sum(not torch.equal(p, before[n]) for n, p in policy.model[0].named_parameters())
    assert changed > 0, "a finite step changed nothing"
    destroy_distributed()


if __name__ == "__main__":
    main()
