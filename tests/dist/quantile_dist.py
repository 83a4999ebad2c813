"""Distributed checks of megatron_rlvr.ops.quantile against a gathered torch.topk / stable-sort
reference. Run under torchrun (the platform's backend; on CPU in strict device mode) with 4
processes, and with 2 for the rank-count check; asserts on every rank and exits non-zero on failure.
The op runs on platform.device(); the reference is computed on the host from gathered host copies.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from megatron_rlvr import platform
from megatron_rlvr.ops.quantile import kth_largest, top_ratio_mask
from megatron_rlvr.fast_exit import exit_now

RATIOS = (0.0, 0.2, 1.0, 1e-9)  # 1e-9 gives k = 1


def expected_k(ratio: float, n: int) -> int:
    return {0.0: 0, 0.2: -(-n // 5), 1.0: n, 1e-9: min(n, 1)}[ratio]


def global_case(name: str, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same [rows, cols] entropies and response mask on every rank (fixed seed), drawn on the
    host and returned on the device."""
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    mask = torch.rand(rows, cols, generator=g) < 0.8
    if name == "random":
        values = torch.randn(rows, cols, generator=g)
    elif name == "heavy_ties":  # most CoT tokens have entropy exactly 0 (some computed as -0.0)
        values = torch.where(torch.rand(rows, cols, generator=g) < 0.85,
                             torch.where(torch.rand(rows, cols, generator=g) < 0.5, 0.0, -0.0),
                             torch.rand(rows, cols, generator=g))
    elif name == "quantized":  # ties at every level
        values = torch.randint(0, 6, (rows, cols), generator=g).float() * 0.5
    elif name == "negative_subnormal":
        choices = torch.tensor([-2.0, -1e-40, -1e-45, -0.0, 0.0, 1e-45, 1e-40, 3e-38, -3e-38, 7.5])
        values = choices[torch.randint(0, len(choices), (rows, cols), generator=g)]
        values += torch.where(torch.rand(rows, cols, generator=g) < 0.3,
                              torch.randn(rows, cols, generator=g) * 1e-39, 0.0)
    else:
        raise ValueError(name)
    return values.to(platform.device()), mask.to(platform.device())


def split_rows(t: torch.Tensor, sizes: list[int], index: int) -> torch.Tensor:
    return t.split(sizes)[index]


def gathered(t: torch.Tensor, group) -> torch.Tensor:
    """Every member's tensor, flattened, concatenated in group-rank order, on the host (a pickled
    device tensor would come back on its sender's device)."""
    parts = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, t.flatten().cpu(), group=group)
    return torch.cat(parts)


def reference_mask(values: torch.Tensor, mask: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """Top k by stable sort: ties keep the earliest global positions."""
    fill = float("-inf") if largest else float("inf")
    order = torch.sort(torch.where(mask, values, fill), descending=largest, stable=True).indices
    ref = torch.zeros_like(mask)
    ref[order[:k]] = True
    return ref


def check_against_gathered(name: str, values, mask, group) -> None:
    """Ours on this rank's slice vs. the reference computed on the gathered global tensors."""
    all_values, all_mask = gathered(values, group), gathered(mask, group)
    masked = all_values[all_mask]
    n = masked.numel()
    me = dist.get_rank(group)
    offsets = [0] * (dist.get_world_size(group) + 1)
    counts = [None] * dist.get_world_size(group)
    dist.all_gather_object(counts, values.numel(), group=group)
    for i, c in enumerate(counts):
        offsets[i + 1] = offsets[i] + c
    mine = slice(offsets[me], offsets[me + 1])
    for k in sorted({1, max(1, n // 5), n}):
        ours = kth_largest(values, mask, k, group=group).cpu()
        ref = torch.topk(masked, k).values[-1]
        assert ours.dtype == torch.float32 and ours.shape == ()
        assert ours.view(torch.int32) == (ref + 0.0).view(torch.int32), \
            f"{name}: kth_largest(k={k}) = {ours.item()!r}, topk gives {ref.item()!r}"
    for ratio in RATIOS:
        for largest in (True, False):
            k = expected_k(ratio, n)
            ours = top_ratio_mask(values, mask, ratio, group=group, largest=largest)
            assert ours.shape == values.shape and ours.dtype == torch.bool
            selected = ours.sum().view(1)
            ours = ours.cpu()
            dist.all_reduce(selected, group=group)
            assert selected.item() == k, f"{name} ratio={ratio}: selected {selected.item()} != {k}"
            ref = reference_mask(all_values, all_mask, k, largest)[mine].view(values.shape)
            assert torch.equal(ours, ref), \
                f"{name} ratio={ratio} largest={largest}: mask differs from the reference on " \
                f"rank {me} at {(ours != ref).nonzero()[:5].tolist()}"


def main() -> None:
    platform.setup()  # on CPU in strict mode: "cuda" is a device apart from the host
    dist.init_process_group(platform.backend())
    dev = platform.device()
    world, rank = dist.get_world_size(), dist.get_rank()
    world_group = dist.group.WORLD
    cases = ("random", "heavy_ties", "quantized", "negative_subnormal")

    # Same global tokens split contiguously over `world` ranks: the same selection as 1 process.
    for name in cases:
        values, mask = global_case(name, 8 * 4, 37)
        whole = {(r, lg): top_ratio_mask(values, mask, r, largest=lg)
                 for r in RATIOS for lg in (True, False)}
        sizes = [values.shape[0] // world] * world
        mine_v, mine_m = split_rows(values, sizes, rank), split_rows(mask, sizes, rank)
        for (ratio, largest), ref in whole.items():
            ours = top_ratio_mask(mine_v, mine_m, ratio, group=world_group, largest=largest)
            assert torch.equal(ours, split_rows(ref, sizes, rank)), \
                f"{name} ratio={ratio} largest={largest}: {world} ranks select other tokens than 1"
        check_against_gathered(name, mine_v, mine_m, world_group)

    if world == 4:
        # Uneven splits: rank 1 holds no tokens at all, rank 3 only masked-out tokens.
        for name in cases:
            values, mask = global_case(name, 40, 29)
            sizes = [17, 0, 15, 8]
            mine_v, mine_m = split_rows(values, sizes, rank), split_rows(mask, sizes, rank)
            if rank == 3:
                mine_m = torch.zeros_like(mine_m)
            check_against_gathered(f"{name}/uneven", mine_v, mine_m, world_group)

        # A subgroup (ranks 1 and 3): group ranks, not global ranks, give the order.
        sub = dist.new_group([1, 3])
        if rank in (1, 3):
            values, mask = global_case("heavy_ties", 20, 31)
            mine = [slice(0, 12), slice(12, 20)][dist.get_rank(sub)]
            check_against_gathered("heavy_ties/subgroup", values[mine], mask[mine], sub)

        # No masked token anywhere: nothing selected; a k-th value does not exist.
        values = torch.randn(6, 5, device=dev)
        mask = torch.zeros(6, 5, dtype=torch.bool, device=dev)
        assert not top_ratio_mask(values, mask, 0.2, group=world_group).any()
        try:
            kth_largest(values, mask, 1, group=world_group)
            raise AssertionError("kth_largest on zero masked values did not raise")
        except ValueError as e:
            assert "out of range" in str(e) and "holds 0 masked values" in str(e), e

        # A NaN on one rank only: every rank raises (none is left waiting in a collective).
        values, mask = torch.rand(50, device=dev), torch.ones(50, dtype=torch.bool, device=dev)
        if rank == 2:
            values[7] = float("nan")
        for fn in (lambda: top_ratio_mask(values, mask, 0.2, group=world_group),
                   lambda: kth_largest(values, mask, 3, group=world_group)):
            try:
                fn()
                raise AssertionError(f"rank {rank}: NaN on rank 2 did not raise here")
            except ValueError as e:
                assert "1 masked value(s) across the group are NaN or inf" in str(e), e
                assert ("first at flattened index 7" in str(e)) == (rank == 2), e
        # The group is still usable afterwards: 20% of 4 x 50 tokens.
        selected = top_ratio_mask(torch.rand(50, device=dev), mask, 0.2, group=world_group).sum().view(1)
        dist.all_reduce(selected)
        assert selected.item() == 40, selected

    dist.barrier()
    if rank == 0:
        print(f"quantile_dist: all checks passed on {world} ranks")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    exit_now(0)  # skip the interpreter's teardown (megatron_rlvr/fast_exit.py)
