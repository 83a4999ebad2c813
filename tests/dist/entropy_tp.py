"""Vocab-parallel logprobs_and_entropy on every rank vs the float64 single-process reference.

Run under torchrun (the platform's backend: gloo on CPU, in strict device mode there). Every rank
builds the same full-vocabulary inputs on the host, computes the reference there, moves its shard to
platform.device() and checks its outputs and its shard of the gradients (compared on the host).
TP groups: the whole world, and with 4 processes also two groups of 2 (ranks inside a group are
not the global ranks).
"""
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_entropy import TOL, random_logits, reference  # noqa: E402

from megatron_rlvr import platform  # noqa: E402
from megatron_rlvr.fast_exit import exit_now  # noqa: E402
from megatron_rlvr.ops import logprobs_and_entropy, logprobs_and_entropy_from_hidden  # noqa: E402


def dev(*tensors):
    """The tensors moved to this rank's device (the op runs where the model's logits are)."""
    moved = tuple(t.to(platform.device()) for t in tensors)
    return moved if len(moved) > 1 else moved[0]


def shard(full, group):
    tp, r = dist.get_world_size(group), dist.get_rank(group)
    size = full.shape[-1] // tp
    return full[..., r * size:(r + 1) * size]


def run_op(logits_shard, labels, temperature, w_logp, w_ent, group, **kw):
    x = logits_shard.clone().requires_grad_()
    logp, ent = logprobs_and_entropy(x, labels, temperature=temperature, tp_group=group, **kw)
    loss = (logp * w_logp).sum() + ((ent * w_ent).sum() if ent.requires_grad else 0)
    loss.backward()
    assert torch.equal(x.detach(), logits_shard), "logits were modified"
    return logp.detach(), ent.detach(), x.grad


def check(got, ref, tol=TOL):
    for g, r in zip(got, ref):
        torch.testing.assert_close(g.float().cpu(), r.float().cpu(), **tol)


def check_against_reference(group, seed):
    vocab = 96
    for temperature in (0.6, 1.0, 1.7):
        for entropy_grad in (False, True):
            for dtype in (torch.float32, torch.bfloat16):
                seed += 1
                gen = torch.Generator().manual_seed(seed)
                logits = random_logits(gen, 3, 5, vocab, dtype=dtype)
                labels = torch.randint(0, vocab, (3, 5), generator=gen)
                w_logp, w_ent = torch.randn(3, 5, generator=gen), torch.randn(3, 5, generator=gen)
                logp_ref, ent_ref, grad_ref = reference(logits, labels, temperature, w_logp,
                                                        w_ent if entropy_grad else 0 * w_ent)
                inputs = dev(shard(logits, group), labels, w_logp, w_ent)
                got = run_op(*inputs[:2], temperature, *inputs[2:], group,
                             chunk_size=4, entropy_grad=entropy_grad)
                grad_tol = TOL if dtype == torch.float32 else dict(atol=1e-4, rtol=1e-2)
                check(got[:2], (logp_ref, ent_ref))
                check(got[2:], (shard(grad_ref, group),), grad_tol)
                whole = run_op(*inputs[:2], temperature, *inputs[2:], group,
                               chunk_size=None, entropy_grad=entropy_grad)
                check(got, whole, dict(atol=1e-6, rtol=1e-6))


def check_padded_vocabulary(group):
    """Columns 21..31 are padding (-inf): with TP=4 rank 3's whole shard is padding."""
    real, vocab = 21, 32
    gen = torch.Generator().manual_seed(7)
    logits = random_logits(gen, 4, real)
    labels = torch.randint(0, real, (4,), generator=gen)
    w_logp, w_ent = torch.randn(4, generator=gen), torch.randn(4, generator=gen)
    padded = torch.cat([logits, torch.full((4, vocab - real), float("-inf"))], dim=-1)
    logp_ref, ent_ref, grad_ref = reference(logits, labels, 0.8, w_logp, w_ent)
    grad_ref = torch.cat([grad_ref, torch.zeros(4, vocab - real, dtype=grad_ref.dtype)], dim=-1)
    got = run_op(dev(shard(padded, group)), dev(labels), 0.8, *dev(w_logp, w_ent), group,
                 chunk_size=3, entropy_grad=True)
    check(got, (logp_ref, ent_ref, shard(grad_ref, group)))


def check_bad_labels(group):
    tp = dist.get_world_size(group)
    logits = torch.randn(2, 6, device=platform.device())
    labels = torch.tensor([0, 6 * tp], device=platform.device())
    try:
        logprobs_and_entropy(logits, labels, tp_group=group)
    except ValueError as e:
        assert f"token ids in [0, {6 * tp}), got ids in [0, {6 * tp}]" in str(e), e
    else:
        raise AssertionError("an out-of-vocabulary label was accepted")


def check_from_hidden(group):
    gen = torch.Generator().manual_seed(11)
    vocab, dim = 64, 8
    hidden = torch.randn(3, 4, dim, generator=gen)
    weight = torch.randn(vocab, dim, generator=gen)
    labels = torch.randint(0, vocab, (3, 4), generator=gen)
    w_logp, w_ent = torch.randn(3, 4, generator=gen), torch.randn(3, 4, generator=gen)
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    logp_all = torch.log_softmax(h64 @ w64.t() / 1.3, dim=-1)
    logp_ref = logp_all.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    ent_ref = -(logp_all.exp() * logp_all).sum(-1)
    ((logp_ref * w_logp).sum() + (ent_ref * w_ent).sum()).backward()
    tp, r = dist.get_world_size(group), dist.get_rank(group)
    rows = slice(r * vocab // tp, (r + 1) * vocab // tp)
    h, w = dev(hidden.clone()).requires_grad_(), dev(weight[rows].clone()).requires_grad_()
    logp, ent = logprobs_and_entropy_from_hidden(h, w, dev(labels), temperature=1.3, tp_group=group,
                                                 chunk_size=5, entropy_grad=True)
    ((logp * dev(w_logp)).sum() + (ent * dev(w_ent)).sum()).backward()
    check((logp, ent, h.grad, w.grad), (logp_ref, ent_ref, h64.grad, w64.grad[rows]))


def main():
    platform.setup()  # on CPU in strict mode: "cuda" is a device apart from the host
    dist.init_process_group(platform.backend())
    world, rank = dist.get_world_size(), dist.get_rank()
    groups = [dist.group.WORLD]
    if world == 4:  # every rank creates every group, then uses its own
        pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        groups.append(pairs[rank // 2])
    for group in groups:
        check_against_reference(group, seed=100 * dist.get_world_size(group))
        check_padded_vocabulary(group)
        check_bad_labels(group)
        check_from_hidden(group)
    dist.barrier()
    print(f"rank {rank}: entropy_tp OK", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    exit_now(0)
