"""Running micro-batches through the (pipelined, context-parallel) GPTModel.

Megatron-Core's schedules do the pipelining; this module only prepares what they need: this
context-parallel rank's slice of each sequence (Megatron's load-balanced order: of 2·cp equal chunks,
rank r takes chunks r and 2·cp−1−r, so every rank gets the same share of causal attention work),
and -inf logits for the vocabulary rows that exist only as tensor-parallel padding.

Two micro-batch layouts (built by `batch.py`):
- padded: per-token tensors [b, s], every sequence right-padded to s;
- packed (THD): sequences concatenated into one row [1, T], each padded only to the sequence-length
  multiple; `cu_seqlens` (host list, and `cu_seqlens_dev` on the device) marks where each begins.
  Megatron gets `PackedSeqParams`, so RoPE restarts at every sequence, and the attention
  (platform/attention.py or Transformer-Engine) keeps each sequence to itself. Under context
  parallelism every sequence is split into 2·cp chunks on its own, as Megatron/TE do for THD.
`local_tokens(mb, x)` gives this rank's tokens of any per-token tensor in either layout.
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


def packed_cp_index(cu_seqlens: list[int], cp_rank: int, cp: int) -> list[int]:
    """Positions (into the packed row) of the tokens a context-parallel rank holds: of every
    sequence, chunks r and 2·cp−1−r of its 2·cp equal chunks, sequence after sequence."""
    index = []
    for lo, hi in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        chunk = (hi - lo) // (2 * cp)
        if chunk * 2 * cp != hi - lo:
            raise ValueError(f"packed sequence of {hi - lo} tokens is not divisible by "
                             f"2·cp = {2 * cp}")
        first = lo + cp_rank * chunk
        second = lo + (2 * cp - 1 - cp_rank) * chunk
        index += list(range(first, first + chunk)) + list(range(second, second + chunk))
    return index


def local_tokens(mb: dict, x: torch.Tensor) -> torch.Tensor:
    """This context-parallel rank's tokens of the per-token tensor `x` of micro-batch `mb`, in
    either layout (padded [b, s] or packed [1, T])."""
    if "cu_seqlens" not in mb:
        return cp_slice(x)
    rank, cp, _ = _cp()
    if cp == 1:
        return x
    index = mb.get("_cp_index")
    if index is None:  # computed once per micro-batch, kept on the device
        index = torch.tensor(packed_cp_index(mb["cu_seqlens"], rank, cp), dtype=torch.long)
        index = mb["_cp_index"] = index.to(x.device)
    return x.index_select(1, index)


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


def packed_seq_params(mb: dict):
    """Megatron's THD description of a packed micro-batch. Each sequence is already padded (at its
    end, where causal attention hides the padding from its real tokens), so the padded and the
    plain boundaries are the same."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = mb["cu_seqlens_dev"]
    longest = max(hi - lo for lo, hi in zip(mb["cu_seqlens"][:-1], mb["cu_seqlens"][1:]))
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             cu_seqlens_q_padded=cu, cu_seqlens_kv_padded=cu,
                             max_seqlen_q=longest, max_seqlen_kv=longest, cp_group=_cp()[2])
    params.cu_seqlens_host = mb["cu_seqlens"]  # read by platform/attention.py without a sync
    return params


def run_micro_batches(model_chunks: list, micro_batches: list[dict], on_logits: Callable, *,
                      vocab_size: int, forward_only: bool):
    """Forward (and backward unless `forward_only`) over `micro_batches` with Megatron's schedule.

    Each micro-batch is a dict with at least `input_ids`: [b, s] whole sequences (padded layout),
    or [1, T] with `cu_seqlens` (packed layout, see the module docstring). Micro-batches may differ
    in shape; with pipeline parallelism the stages then exchange shapes first (Megatron's
    `variable_seq_lengths`). On the last pipeline stage `on_logits(micro_batch, logits)` is called
    with this rank's logits [b, s/cp, V/tp] (float, padded vocab at -inf) and returns either the
    loss triple `(numerator, denominator, logs)` when training, or any data to collect when
    `forward_only`. Returns what the schedule returns: the per-micro-batch results on the last stage.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not micro_batches:
        return []
    shapes = {tuple(mb["input_ids"].shape) for mb in micro_batches}
    b, s = max(shapes, key=lambda shape: shape[0] * shape[1])
    config = _unwrap(model_chunks[0]).config
    config.variable_seq_lengths = len(shapes) > 1

    def loss_func(mb, logits, non_loss_data=False):
        return on_logits(mb, mask_padded_vocab(logits, vocab_size))

    def step(data_iterator, model):
        mb = next(data_iterator)
        tokens = local_tokens(mb, mb["input_ids"])
        if "cu_seqlens" in mb:
            # RoPE positions come from cu_seqlens; position_ids only feed learned embeddings.
            positions = local_tokens(mb, mb["position_ids"])
            logits = model(tokens, positions, attention_mask=None,
                           packed_seq_params=packed_seq_params(mb))
        else:
            n, length = mb["input_ids"].shape
            positions = cp_slice(torch.arange(length, device=tokens.device).expand(n, length))
            logits = model(tokens, positions, attention_mask=None)
        return logits, partial(loss_func, mb)

    forward_backward = get_forward_backward_func()
    return forward_backward(
        forward_step_func=step, data_iterator=iter(micro_batches), model=model_chunks,
        num_microbatches=len(micro_batches), seq_length=s, micro_batch_size=b,
        forward_only=forward_only, collect_non_loss_data=forward_only)


def _unwrap(module):
    """The GPTModel inside DDP / Float16Module wrappers (their `.config` is the same object, but
    plain modules in tests have no wrapper)."""
    while hasattr(module, "module"):
        module = module.module
    return module
