"""Running micro-batches through the (pipelined, context-parallel) GPTModel.

Megatron-Core's schedules do the pipelining; this module only prepares what they need: this
context-parallel rank's slice of each sequence (Megatron's load-balanced order: of 2·cp equal chunks,
rank r takes chunks r and 2·cp−1−r, so every rank gets the same share of causal attention work),
and -inf logits for the vocabulary rows that exist only as tensor-parallel padding.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch
import torch.distributed as dist


def _cp():
    from megatron.core import parallel_state
    return (parallel_state.get_context_parallel_rank(),
            parallel_state.get_context_parallel_world_size(),
            parallel_state.get_context_parallel_group())


def sequence_length_multiple(*, tp: int, cp: int, sequence_parallel: bool) -> int:
    """What every padded sequence length must divide by: 2·cp for the load-balanced context-parallel
    split (when cp > 1); with sequence parallelism each rank's s/cp tokens are further split tp
    ways, so 2·cp·tp (tp when cp = 1)."""
    multiple = 2 * cp if cp > 1 else 1
    return multiple * tp if sequence_parallel else multiple


def cp_slice(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """This context-parallel rank's tokens of `x` along `dim` (the sequence dimension)."""
    rank, cp, _ = _cp()
    if cp == 1:
        return x
    if x.shape[dim] % (2 * cp):
        raise ValueError(f"sequence length {x.shape[dim]} is not divisible by 2·cp = {2 * cp}")
    chunks = x.chunk(2 * cp, dim=dim)
    return torch.cat([chunks[rank], chunks[2 * cp - 1 - rank]], dim=dim)


def cp_gather(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """The inverse of `cp_slice`: every rank's tokens back in sequence order (not differentiable)."""
    _, cp, group = _cp()
    if cp == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(cp)]
    dist.all_gather(parts, x.contiguous(), group=group)
    chunks = [None] * (2 * cp)
    for r, part in enumerate(parts):
        first, second = part.chunk(2, dim=dim)
        chunks[r], chunks[2 * cp - 1 - r] = first, second
    return torch.cat(chunks, dim=dim)


def mask_padded_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Set the logits of vocabulary-padding rows (ids >= vocab_size) on this TP shard to -inf."""
    from megatron.core import parallel_state

    v_local = logits.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * v_local
    n_pad = start + v_local - max(vocab_size, start)
    if n_pad <= 0:
        return logits
    keep = logits[..., : v_local - n_pad]
    pad = torch.full_like(logits[..., v_local - n_pad:], float("-inf"))
    return torch.cat([keep, pad], dim=-1)


def gather_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Full-vocabulary logits from the TP shards (for checks and tests, not the training path)."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp > 1:
        parts = [torch.empty_like(logits) for _ in range(tp)]
        dist.all_gather(parts, logits.contiguous(),
                        group=parallel_state.get_tensor_model_parallel_group())
        logits = torch.cat(parts, dim=-1)
    return logits[..., :vocab_size]


def run_micro_batches(model_chunks: list, micro_batches: list[dict], on_logits: Callable, *,
                      vocab_size: int, forward_only: bool):
    """Forward (and backward unless `forward_only`) over `micro_batches` with Megatron's schedule.

    Each micro-batch is a dict with at least `input_ids` [b, s] (whole sequences; all micro-batches
    share b and s). On the last pipeline stage `on_logits(micro_batch, logits)` is called with this
    rank's logits [b, s/cp, V/tp] (float, padded vocab at -inf) and returns either the loss triple
    `(numerator, denominator, logs)` when training, or any data to collect when `forward_only`.
    Returns what the schedule returns: the list of per-micro-batch results on the last stage.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not micro_batches:
        return []
    b, s = micro_batches[0]["input_ids"].shape
    for i, mb in enumerate(micro_batches):
        if tuple(mb["input_ids"].shape) != (b, s):
            raise ValueError(f"micro-batch {i} has shape {tuple(mb['input_ids'].shape)}, "
                             f"expected {(b, s)}: pad every micro-batch of a call alike")

    def loss_func(mb, logits, non_loss_data=False):
        return on_logits(mb, mask_padded_vocab(logits, vocab_size))

    def step(data_iterator, model):
        mb = next(data_iterator)
        tokens = cp_slice(mb["input_ids"])
        positions = cp_slice(torch.arange(s, device=tokens.device).expand(b, s))
        logits = model(tokens, positions, attention_mask=None)
        return logits, partial(loss_func, mb)

    forward_backward = get_forward_backward_func()
    return forward_backward(
        forward_step_func=step, data_iterator=iter(micro_batches), model=model_chunks,
        num_microbatches=len(micro_batches), seq_length=s, micro_batch_size=b,
        forward_only=forward_only, collect_non_loss_data=forward_only)
