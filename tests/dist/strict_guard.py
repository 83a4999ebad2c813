"""Run under torchrun (strict device mode): the guard catches each class of device bug it exists for.

Each case is the pattern of one GPU-readiness finding (issue 16), written as the code before the fix
had it; each must raise DeviceMixError here, as it would fail on a GPU. The same steps done right
must pass.

    MEGATRON_RLVR_STRICT_DEVICE=1 torchrun --nproc_per_node=2 tests/dist/strict_guard.py HF_DIR
"""
import sys
from functools import partial

import torch
import torch.distributed as dist

from megatron_rlvr import platform
from megatron_rlvr.algos.high_entropy import LossSettings, choose_tokens, dapo_loss, token_stats
from megatron_rlvr.models.pipeline import run_micro_batches
from megatron_rlvr.models.spec import read_model_spec
from megatron_rlvr.parallel import destroy_distributed, host_group, init_distributed
from megatron_rlvr.platform.strict_device import DeviceMixError, is_device
from megatron_rlvr.policy import OptimConfig, Policy
from megatron_rlvr.fast_exit import exit_now


def raises(fn, what):
    try:
        fn()
    except DeviceMixError as e:
        assert what in str(e), f"DeviceMixError without {what!r}: {e}"
        return str(e)
    raise AssertionError(f"no DeviceMixError for: {what}")


def main():
    assert platform.strict_device_mode(), "run with MEGATRON_RLVR_STRICT_DEVICE=1"
    init_distributed(2, 1, 1)
    dev = platform.device()
    assert dev.type == "cuda"
    spec = read_model_spec(sys.argv[1])
    policy = Policy(spec, sys.argv[1], dtype=torch.float32,
                    optim=OptimConfig(lr=1e-3, weight_decay=0.0))
    params = list(policy.model[0].parameters())
    assert all(is_device(p) for p in params), "model parameters are not on the device"

    # Basic semantics: moves copy, results of device ops are device, host scalars are allowed.
    host = torch.ones(3)
    moved = host.to(dev)
    assert is_device(moved) and not is_device(host) and moved.device == dev and moved.is_cuda
    assert not is_device(moved.cpu()) and is_device(moved * 2) and is_device(moved * torch.tensor(2.))
    raises(lambda: moved + host, "aten::add")
    # x.new_tensor(data) and friends are on x's device (the data comes from the host).
    assert all(is_device(t) for t in (moved.new_tensor(float("inf")), moved.new_zeros(2),
                                      moved.new_full((2,), 1.0)))
    assert not is_device(host.new_tensor(1.0))
    raises(lambda: moved.numpy(), "numpy")

    # Finding 1: the batch built on the host and fed to the model (embedding on mixed devices).
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, spec.vocab_size, (2, 16), generator=gen)
    msg = raises(lambda: run_micro_batches(policy.model, [{"input_ids": ids}], lambda mb, lg: lg,
                                           vocab_size=spec.vocab_size, forward_only=True),
                 "aten::embedding")
    assert "pipeline.py" in msg, f"the message does not point at our caller: {msg}"

    # Finding 2: a host denominator stacked with a device numerator, and a host tensor in an
    # all-reduce on a training group (NCCL refuses host tensors).
    numerator = torch.zeros((), device=dev)
    raises(lambda: torch.stack([numerator.reshape(1), torch.ones(1)]), "aten::cat")
    raises(lambda: dist.all_reduce(torch.zeros(2)), "all_reduce")
    dist.all_reduce(torch.zeros(2, device=dev))  # fine on the device
    dist.all_reduce(torch.zeros(2), group=host_group())  # fine on the host group
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {"rank": dist.get_rank()})  # NCCL-style object collective
    assert [g["rank"] for g in gathered] == list(range(dist.get_world_size()))

    # Finding 3: a host generator driving a device random op.
    ent = torch.rand(4, 8, device=dev)
    mask = torch.ones(4, 8, dtype=torch.bool, device=dev)
    settings = LossSettings(temperature=1.0, clip_ratio_low=0.2, clip_ratio_high=0.28,
                            clip_ratio_c=10.0, loss_agg_mode="token-mean", ratio=0.2,
                            scope="micro_batch", norm="kept_tokens", select="random")
    raises(lambda: choose_tokens(ent, mask, settings, None, torch.Generator().manual_seed(1)),
           "Generator")
    keep = choose_tokens(ent, mask, settings, None, platform.generator(1))
    assert is_device(keep) and int(keep.sum()) == 7  # ceil(0.2 * 32)

    # Done right: a DAPO step on device micro-batches (old pass, then the update) passes the guard.
    ids = ids.to(dev)
    response = torch.zeros(2, 16, dtype=torch.bool, device=dev)
    response[:, 5:15] = True
    mb = {"input_ids": ids, "labels": torch.roll(ids, -1, 1), "response_mask": response,
          "advantages": torch.tensor([[1.0], [-1.0]], device=dev).expand(2, 16).contiguous()}
    top = LossSettings(**{**settings.__dict__, "select": "top"})
    mb["old_logprobs_local"] = policy.forward([mb], partial(token_stats, s=top))[0]["logprobs"]
    before = [p.detach().clone() for p in params]
    result = policy.train_step([mb], partial(dapo_loss, s=top, generator=platform.generator(2)))
    assert not result.skipped and result.grad_norm > 0, result
    assert any(not torch.equal(a, p) for a, p in zip(before, params)), "the step moved nothing"

    # Finding 5: parallel.sequence_parallel reaches the model config (here it must be refused:
    # Megatron's sequence parallelism needs Transformer-Engine's norms, absent on CPU).
    try:
        Policy(spec, sys.argv[1], dtype=torch.float32, optim=OptimConfig(), sequence_parallel=True)
    except ValueError as e:
        assert "sequence_parallel" in str(e) and "Transformer-Engine" in str(e), e
    else:
        raise AssertionError("sequence_parallel=True did not reach the model config")
    print(f"rank {dist.get_rank()}: strict guard OK", flush=True)
    destroy_distributed()


if __name__ == "__main__":
    main()
    exit_now(0)  # skip the interpreter's teardown (megatron_rlvr/fast_exit.py)
