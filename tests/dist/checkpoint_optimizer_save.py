"""Run under torchrun (2 processes, DP2): the optimizer save without gather, and `_extra_state`.

    torchrun --nproc_per_node=2 tests/dist/checkpoint_optimizer_save.py --work W --hf H

Optimizer: a bf16 Policy takes one step; its checkpoint is saved twice, by our per-owner save and
by Megatron's gathering `fully_reshardable` save. At DP2 the distributed optimizer splits some
parameter between the two ranks (asserted), so the assembly path runs too. The two checkpoints
must hold the same tensors bit for bit; a resume from ours must take the same next step as the
run that never stopped.

`_extra_state`: Transformer-Engine layers carry `_extra_state` entries that Megatron's local layers
do not all have (TE's attention does; the local one does not). TE is not installed here, so a mock
gives the local attention modules a `get_extra_state`/`set_extra_state` pair, which is all that
makes PyTorch and Megatron add such an entry (nothing else is mocked). Checkpoints go both ways;
a mismatch in any other key is still an error.
"""
import argparse

import torch
import torch.distributed as dist
from megatron_rlvr.fast_exit import exit_now


def ce_loss(mb, logits):
    from megatron.core import tensor_parallel

    losses = tensor_parallel.vocab_parallel_cross_entropy(
        logits.float().transpose(0, 1).contiguous(), mb["labels"].transpose(0, 1).contiguous())
    num = losses.sum()
    den = torch.tensor(losses.numel(), dtype=torch.int, device=num.device)  # stacked with num
    return num, den, {"numerator": num.detach(), "denominator": den}


def split_params(policy) -> int:
    """Parameters whose optimizer state the distributed optimizer splits between DP ranks."""
    from megatron.core import parallel_state

    dp = parallel_state.get_data_parallel_world_size()
    n = 0
    for buffer in policy.model[0].buffers:
        for start, end, bucket_id in buffer.param_index_map.values():
            bucket = buffer.buckets[bucket_id]
            local = bucket.grad_data.numel() // dp
            n += (start - bucket.offset) // local != (end - 1 - bucket.offset) // local
    return n


class TELikeAttention:
    """Mock of what Transformer-Engine's attention adds to the state dict: an `_extra_state`."""

    def get_extra_state(self):
        return torch.tensor([7.0])

    def set_extra_state(self, state):
        self.loaded_extra_state = state


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    names = [n for n in sa if not n.endswith("_extra_state")]
    assert names == [n for n in sb if not n.endswith("_extra_state")]
    for n in names:
        assert torch.equal(sa[n], sb[n]), n


def te_like(model):
    for layer in model.decoder.layers:
        attn = layer.self_attention.core_attention
        attn.__class__ = type("TELike" + type(attn).__name__, (TELikeAttention, type(attn)), {})
    return model


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--work", required=True)
    p.add_argument("--hf", required=True)
    args = p.parse_args()
    W = args.work

    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from megatron.core.dist_checkpointing.validation import StrictHandling

    from megatron_rlvr import checkpoint, platform
    from megatron_rlvr.checkpoint import load_checkpoint, save_checkpoint
    from megatron_rlvr.models.builder import build_model
    from megatron_rlvr.models.hf_checkpoint import CheckpointError
    from megatron_rlvr.models.spec import read_model_spec
    from megatron_rlvr.parallel import init_distributed
    from megatron_rlvr.policy import OptimConfig, Policy

    init_distributed(1, 1, 1)
    rank = dist.get_rank()
    spec = read_model_spec(args.hf)
    tokens = torch.randint(1, spec.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    dev = platform.device()
    mbs = [{"input_ids": tokens[rank:rank + 1].to(dev),
            "labels": torch.roll(tokens, -1, 1)[rank:rank + 1].to(dev)}]

    def make_policy():
        return Policy(spec, args.hf, dtype=torch.bfloat16, optim=OptimConfig(lr=1e-3))

    # ---------------------------------------------------------------- optimizer save
    policy = make_policy()
    assert split_params(policy) > 0, "no parameter is split between the DP ranks"
    policy.train_step(mbs, ce_loss)
    save_checkpoint(f"{W}/ours", policy.model, hf_dir=args.hf, optimizer=policy.optimizer)
    checkpoint.OPTIMIZER_SAVE = "gather"
    save_checkpoint(f"{W}/megatron", policy.model, hf_dir=args.hf, optimizer=policy.optimizer)
    checkpoint.OPTIMIZER_SAVE = "by_owner"
    if rank == 0:
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
        for name in ("ours", "megatron"):
            dcp_to_torch_save(f"{W}/{name}", f"{W}/{name}.pt")
        a, b = torch.load(f"{W}/ours.pt"), torch.load(f"{W}/megatron.pt")
        assert sorted(a) == sorted(b), sorted(set(a) ^ set(b))
        for k in a:
            if isinstance(a[k], torch.Tensor):
                assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
            else:
                assert type(a[k]) is type(b[k]), k  # sharded objects (`_extra_state`: None)
        opt_keys = [k for k in a if k.startswith("optimizer.state.")]
        moments = {k.split(".", 3)[3] for k in opt_keys if k.startswith("optimizer.state.exp_avg.")}
        assert moments and all(f"optimizer.state.{s}.{m}" in a for m in moments
                               for s in ("param", "exp_avg_sq")), opt_keys
        print(f"optimizer save: {len(a)} tensors ({len(opt_keys)} optimizer) equal to "
              f"Megatron's gathered save; {split_params(policy)} split parameters", flush=True)
    ref = policy.train_step(mbs, ce_loss).loss
    ref_weights = {n: t.clone() for n, t in policy.hf_weights()}
    del policy
    resumed = make_policy()
    load_checkpoint(f"{W}/ours", resumed.model, spec=spec, optimizer=resumed.optimizer)
    loss = resumed.train_step(mbs, ce_loss).loss
    diff = max((t - ref_weights[n]).abs().max().item() for n, t in resumed.hf_weights())
    assert loss == ref and diff == 0, (loss, ref, diff)
    del resumed
    if rank == 0:
        print(f"resume from the per-owner save: step equal (loss {loss:.6f})", flush=True)

    # ---------------------------------------------------------------- _extra_state
    local = build_model(spec)
    save_checkpoint(f"{W}/local", [local], hf_dir=args.hf)
    te = te_like(build_model(spec))
    for prm in te.parameters():
        prm.data.zero_()
    keys = checkpoint._sharded_state(te, None, is_loading=True)["model"].keys()
    extra = [k for k in keys if k.endswith("core_attention._extra_state")]
    assert extra, "the mock added no _extra_state"
    # Megatron's strict load (what load_checkpoint did before): refuses the local checkpoint.
    try:
        dist_checkpointing.load(checkpoint._sharded_state(te, None, is_loading=True),
                                f"{W}/local", strict=StrictHandling.RAISE_UNEXPECTED)
        raise AssertionError("strict load accepted a checkpoint without _extra_state")
    except CheckpointingException:
        pass
    load_checkpoint(f"{W}/local", [te], spec=spec)  # CPU-written -> "TE" model
    assert_same_weights(local, te)
    save_checkpoint(f"{W}/te", [te], hf_dir=args.hf)
    back = build_model(spec)
    load_checkpoint(f"{W}/te", [back], spec=spec)  # "TE"-written -> local model
    assert_same_weights(local, back)
    # Any other key the checkpoint lacks is still an error.
    other = build_model(spec)
    other.decoder.final_layernorm.register_parameter(
        "bias", torch.nn.Parameter(torch.zeros(spec.hidden_size, device=dev)))
    try:
        load_checkpoint(f"{W}/local", [other], spec=spec)
        raise AssertionError("loaded a checkpoint that lacks a tensor")
    except CheckpointError as e:
        assert "decoder.final_layernorm.bias" in str(e) and "_extra_state" not in str(e), e
        if rank == 0:
            print(f"other keys still refused: {str(e)[-160:]}", flush=True)
    if rank == 0:
        print(f"extra_state: {len(extra)} TE-only _extra_state keys tolerated both ways", flush=True)
        print("checkpoint_optimizer_save OK", flush=True)


if __name__ == "__main__":  # Megatron's checkpoint save starts a helper that re-imports this file
    main()
    exit_now(0)  # skip the interpreter's teardown (megatron_rlvr/fast_exit.py)
