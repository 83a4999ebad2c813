"""Core attention for Megatron's local (non Transformer-Engine) layer spec, with context parallelism.

Stock Megatron-Core supports context parallelism only through TEDotProductAttention, and TE does not
exist on CPU machines. This module takes Megatron's place of `core_attention` and:
- all-gathers K and V over the context-parallel group (the backward sums the gradients of the
  gathered copies and keeps this rank's slice);
- masks causally by *global* token position, which undoes Megatron's load-balanced layout (rank r
  holds sequence chunks r and 2·cp−1−r of 2·cp equal chunks) without moving any tensor;
- computes softmax in float32 with torch's scaled_dot_product_attention (GQA native) on CPU; on a
  GPU it stays in the compute dtype, and with cp = 1 it takes SDPA's causal fast path
  (flash / memory-efficient kernels, no O(s²) mask).

With cp = 1 it is plain causal attention. Sequences are right-padded, so a causal mask is all that
valid tokens need; padding positions compute garbage that the loss never reads.

Packed sequences (THD, `packed_seq_params.qkv_format == "thd"`): query/key/value come as [t, heads,
d] with the sequences of a micro-batch one after another (each split into 2·cp chunks under context
parallelism, as in models/pipeline.py). Attention is computed sequence by sequence, so nothing
crosses a boundary and the cost is Σ length², not T².
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer.module import MegatronModule


def cp_token_positions(cp_rank: int, cp_size: int, local_len: int, device=None) -> torch.Tensor:
    """Global positions of the `local_len` tokens a context-parallel rank holds."""
    if cp_size == 1:
        return torch.arange(local_len, device=device)
    chunk = local_len // 2
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk, device=device)
    second_start = (2 * cp_size - 1 - cp_rank) * chunk
    second = torch.arange(second_start, second_start + chunk, device=device)
    return torch.cat([first, second])


class _GatherSeq(torch.autograd.Function):
    """All-gather along dim 0 over `group`; backward: sum the gradients, keep our slice."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        rank, world = dist.get_rank(ctx.group), dist.get_world_size(ctx.group)
        return grad.chunk(world, dim=0)[rank], None


class ContextParallelAttention(MegatronModule):
    """Drop-in `core_attention` for the local spec (same constructor and forward signature)."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type,
                 attention_dropout=None, softmax_scale=None, cp_comm_type=None,
                 pg_collection=None):
        super().__init__(config=config)
        if config.attention_dropout and (attention_dropout is None or attention_dropout > 0):
            raise ValueError("ContextParallelAttention does not implement attention dropout; "
                             "RL fine-tuning runs with attention_dropout=0")
        self.cp_group = (getattr(pg_collection, "cp", None) if pg_collection is not None
                         else None) or parallel_state.get_context_parallel_group()
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        # query [sq, b, heads, d]; key/value [sq, b, groups, d] for this rank's tokens.
        if attention_bias is not None:
            raise NotImplementedError("attention bias needs Transformer-Engine")
        if packed_seq_params is not None:
            if packed_seq_params.qkv_format != "thd":
                raise NotImplementedError(f"packed format {packed_seq_params.qkv_format!r}")
            return self._packed(query, key, value, packed_seq_params)
        cp, cp_rank = self.cp_group.size(), self.cp_group.rank()
        sq = query.shape[0]
        gqa = query.shape[2] != key.shape[2]
        if cp == 1 and query.is_cuda:
            # GPU without Transformer-Engine: the causal fast path (flash / memory-efficient SDPA
            # kernels, O(s) memory) in the compute dtype; no mask tensor, no float32 copies.
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                 scale=self.softmax_scale, enable_gqa=gqa)
            out = out.permute(2, 0, 1, 3)
            return out.reshape(sq, out.shape[1], -1)
        if cp > 1:
            key = _GatherSeq.apply(key, self.cp_group)
            value = _GatherSeq.apply(value, self.cp_group)
            k_pos = torch.cat([cp_token_positions(r, cp, sq, query.device) for r in range(cp)])
        else:
            k_pos = torch.arange(sq, device=query.device)
        q_pos = cp_token_positions(cp_rank, cp, sq, query.device)
        allowed = k_pos[None, :] <= q_pos[:, None]  # [sq, sk]
        # CPU: float32 softmax (parity with transformers); GPU: the compute dtype, whose
        # memory-efficient kernel takes the mask and accumulates in float32 itself.
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if not query.is_cuda:
            q, k, v = q.float(), k.float(), v.float()
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=self.softmax_scale,
                                             enable_gqa=gqa)
        # [b, heads, sq, d] -> [sq, b, heads * d]
        out = out.to(query.dtype).permute(2, 0, 1, 3)
        return out.reshape(sq, out.shape[1], -1)

    def _packed(self, query, key, value, params):
        """THD: query [t, heads, d], key/value [t, groups, d] (this rank's tokens of every
        sequence); returns [t, heads·d]."""
        cp, cp_rank = self.cp_group.size(), self.cp_group.rank()
        bounds = getattr(params, "cu_seqlens_host", None)  # set by models/pipeline.py: no sync
        if bounds is None:
            device_bounds = params.cu_seqlens_q_padded if params.cu_seqlens_q_padded is not None \
                else params.cu_seqlens_q
            bounds = device_bounds.tolist()
        local = [(hi - lo) // cp for lo, hi in zip(bounds[:-1], bounds[1:])]
        if sum(local) != query.shape[0]:
            raise ValueError(f"packed attention: cu_seqlens describe {sum(local)} local tokens, "
                             f"the query has {query.shape[0]}")
        gqa = query.shape[1] != key.shape[1]
        if cp > 1:  # every rank's keys/values, [cp, t, groups, d]
            keys = _GatherSeq.apply(key, self.cp_group).view(cp, *key.shape)
            values = _GatherSeq.apply(value, self.cp_group).view(cp, *value.shape)
        outs, start = [], 0
        for n in local:
            q = query[start:start + n].transpose(0, 1)[None]  # [1, heads, n, d]
            if cp == 1:
                k = key[start:start + n].transpose(0, 1)[None]
                v = value[start:start + n].transpose(0, 1)[None]
                mask, causal = None, True
            else:
                k = keys[:, start:start + n].reshape(cp * n, *key.shape[1:]).transpose(0, 1)[None]
                v = values[:, start:start + n].reshape(cp * n, *value.shape[1:]).transpose(0, 1)[None]
                k_pos = torch.cat([cp_token_positions(r, cp, n, query.device) for r in range(cp)])
                q_pos = cp_token_positions(cp_rank, cp, n, query.device)
                mask, causal = k_pos[None, :] <= q_pos[:, None], False
            if not query.is_cuda:  # CPU: float32 softmax, as the padded path
                q, k, v = q.float(), k.float(), v.float()
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                                 scale=self.softmax_scale, enable_gqa=gqa)
            outs.append(out[0].transpose(0, 1).to(query.dtype))  # [n, heads, d]
            start += n
        out = torch.cat(outs, dim=0)
        return out.reshape(out.shape[0], -1)
