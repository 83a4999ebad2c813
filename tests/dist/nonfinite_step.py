"""Run under torchrun: a non-finite loss, or a finite loss with a non-finite gradient, skips the
optimizer step and leaves every weight as it was; training goes on afterwards. Then the trainer's
update loop (`Trainer._update`, with the real policy and `dapo_loss`) stops with TrainingAborted
after trainer.max_nonfinite_steps skipped steps in a row, and a finite step resets the count.

    torchrun --nproc_per_node=N tests/dist/nonfinite_step.py --tp T HF_DIR
"""
import argparse

import torch

from megatron_rlvr import platform
from megatron_rlvr.models.spec import read_model_spec
from megatron_rlvr.parallel import destroy_distributed, init_distributed
from megatron_rlvr.policy import OptimConfig, Policy
from megatron_rlvr.fast_exit import exit_now


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
    aborts_after_max_nonfinite_steps(policy, spec, dev)
    destroy_distributed()


def aborts_after_max_nonfinite_steps(policy, spec, dev):
    """The trainer's update loop on this policy. The Trainer is made without its constructor (no
    vLLM engine, data or reward workers: `_update` uses none of them); its policy, config and loss
    settings are the real ones. A mini-batch with NaN advantages has a NaN loss."""
    from megatron_rlvr.algos.high_entropy import LossSettings
    from megatron_rlvr.config import Config
    from megatron_rlvr.trainer import Trainer, TrainingAborted

    cfg = Config()
    cfg.trainer.max_nonfinite_steps = 2
    a = cfg.algorithm
    trainer = Trainer.__new__(Trainer)
    trainer.cfg, trainer.policy, trainer.step, trainer.rank = cfg, policy, 1, 0
    trainer.nonfinite_in_row = 0
    trainer.loss_settings = LossSettings(
        temperature=1.0, clip_ratio_low=a.clip_ratio_low, clip_ratio_high=a.clip_ratio_high,
        clip_ratio_c=a.clip_ratio_c, loss_agg_mode=a.loss_agg_mode, ratio=1.0,
        scope="global", norm="kept_tokens", select="top")

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, spec.vocab_size, (2, 16), generator=g)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, 5:15] = True

    def mini_batch(advantage):
        mb = {"input_ids": ids, "labels": torch.roll(ids, -1, 1), "response_mask": mask,
              "advantages": torch.full((2, 16), advantage), "rollout_logprobs": torch.zeros(2, 16),
              "num_sequences": 2}
        return [{k: v.to(dev) if torch.is_tensor(v) else v for k, v in mb.items()}]

    nan, good = float("nan"), 1.0
    stats = trainer._update([mini_batch(nan)], None)  # 1 in a row: skipped, go on
    assert stats["actor/skipped_updates"] == 1.0 and trainer.nonfinite_in_row == 1, stats
    stats = trainer._update([mini_batch(good)], None)  # a finite step resets the count
    assert stats["actor/skipped_updates"] == 0.0 and trainer.nonfinite_in_row == 0, stats
    trainer._update([mini_batch(nan)], None)
    try:
        trainer._update([mini_batch(nan)], None)  # the second in a row: stop
    except TrainingAborted as e:
        assert "2 optimizer steps in a row" in str(e) and "max_nonfinite_steps" in str(e), e
    else:
        raise AssertionError("no TrainingAborted after max_nonfinite_steps non-finite steps")
    if torch.distributed.get_rank() == 0:
        print("ok TrainingAborted after 2 non-finite steps in a row", flush=True)


if __name__ == "__main__":
    main()
    exit_now(0)  # skip the interpreter's teardown (megatron_rlvr/fast_exit.py)
