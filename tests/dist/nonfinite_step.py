"""Run under torchrun: a non-finite loss skips the optimizer step and leaves every weight as it was.

    torchrun --nproc_per_node=N tests/dist/nonfinite_step.py --tp T HF_DIR
"""
import argparse

import torch

from megatron_rlvr.models.spec import read_model_spec
from megatron_rlvr.parallel import destroy_distributed, init_distributed
from megatron_rlvr.policy import OptimConfig, Policy


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("hf_dir")
    args = p.parse_args()
    init_distributed(args.tp, 1, 1)
    spec = read_model_spec(args.hf_dir)
    policy = Policy(spec, args.hf_dir, dtype=torch.float32, optim=OptimConfig(lr=1e-2))
    tokens = torch.randint(1, spec.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    mbs = [{"input_ids": tokens}]

    def loss(poison):
        def fn(mb, logits):
            value = logits.float().mean() * (float("nan") if poison else 1.0)
            den = torch.tensor(1, dtype=torch.int)
            return value, den, {"numerator": value.detach(), "denominator": den}
        return fn

    before = {n: p.detach().clone() for n, p in policy.model[0].named_parameters()}
    result = policy.train_step(mbs, loss(poison=True))
    assert result.skipped and result.loss != result.loss, result
    for n, p in policy.model[0].named_parameters():
        assert torch.equal(p, before[n]), f"{n} changed by a skipped step"
    result = policy.train_step(mbs, loss(poison=False))  # and training goes on afterwards
    assert not result.skipped and result.grad_norm > 0
    changed = sum(not torch.equal(p, before[n]) for n, p in policy.model[0].named_parameters())
    assert changed > 0, "a finite step changed nothing"
    destroy_distributed()


if __name__ == "__main__":
    main()
