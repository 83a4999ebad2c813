"""How Hugging Face tensors become Megatron tensor-parallel shards, and back.

A `Rule` ties one Megatron parameter to the Hugging Face tensors it is made of, with a `Layout`
that says how it is split over tensor-parallel ranks:

- REPLICATED: norms; every rank holds the whole tensor.
- VOCAB: embedding and output layer; rows split by vocabulary, padded to a multiple of tp.
- ROW: Megatron's RowParallelLinear (o_proj, down_proj); split along the input dim (dim 1).
- QKV: q, k, v fused per query group as Megatron expects: for each of the G kv heads,
  [its q heads, its k head, its v head]; tp ranks hold whole groups.
- GATED_FC1: gate and up fused; each rank holds [its slice of gate; its slice of up].

This module is the single place that knows these layouts; the loader, the exporter (weight sync
and checkpoint export) and the dry run all use it.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

from megatron_rlvr.models.spec import ModelSpec

if TYPE_CHECKING:  # torch is imported where tensors are cut: the planner and dry runs need none
    import torch


class Layout(enum.Enum):
    REPLICATED = "replicated"
    VOCAB = "vocab"
    ROW = "row"
    QKV = "qkv"
    GATED_FC1 = "gated_fc1"


@dataclass(frozen=True)
class Rule:
    """One Megatron parameter (`megatron` name, `{i}` = global layer) and its HF sources."""
    megatron: str
    hf: tuple[str, ...]
    layout: Layout

    def for_layer(self, i: int) -> "Rule":
        return Rule(self.megatron.format(i=i), tuple(n.format(i=i) for n in self.hf), self.layout)


def hf_shapes(spec: ModelSpec, rule: Rule) -> list[tuple[int, ...]]:
    """The shape of each HF tensor of `rule` (for validation and for receiving buffers)."""
    h, hd = spec.hidden_size, spec.head_dim
    q, kv, ffn = spec.num_heads * hd, spec.num_kv_heads * hd, spec.ffn_hidden_size
    name = rule.megatron
    if rule.layout is Layout.VOCAB:
        return [(spec.vocab_size, h)]
    if rule.layout is Layout.QKV:
        if name.endswith(".bias"):
            return [(q,), (kv,), (kv,)]
        return [(q, h), (kv, h), (kv, h)]
    if rule.layout is Layout.GATED_FC1:
        return [(ffn, h), (ffn, h)]
    if rule.layout is Layout.ROW:
        return [(h, q)] if "linear_proj" in name else [(h, ffn)]
    if "q_layernorm" in name or "k_layernorm" in name:
        return [(hd,)]
    return [(h,)]


def to_megatron_shard(spec: ModelSpec, rule: Rule, tensors: list[torch.Tensor], tp_rank: int,
                      tp: int) -> torch.Tensor:
    """This tp rank's shard of the Megatron parameter made from the HF `tensors`."""
    import torch
    layout = rule.layout
    if layout is Layout.REPLICATED:
        return tensors[0]
    if layout is Layout.VOCAB:
        full = tensors[0]
        pad = spec.padded_vocab_size(tp) - full.shape[0]
        if pad:
            full = torch.cat([full, full.new_zeros(pad, *full.shape[1:])])
        return full.chunk(tp, dim=0)[tp_rank]
    if layout is Layout.ROW:
        return tensors[0].chunk(tp, dim=1)[tp_rank]
    if layout is Layout.GATED_FC1:
        gate, up = tensors
        return torch.cat([gate.chunk(tp, dim=0)[tp_rank], up.chunk(tp, dim=0)[tp_rank]])
    if layout is Layout.QKV:
        q, k, v = tensors
        g, hd, qpg = spec.num_kv_heads, spec.head_dim, spec.heads_per_group
        rest = q.shape[1:]
        grouped = torch.cat([q.reshape(g, qpg * hd, *rest), k.reshape(g, hd, *rest),
                             v.reshape(g, hd, *rest)], dim=1)
        mine = grouped.chunk(tp, dim=0)[tp_rank]
        return mine.reshape(-1, *rest)
    raise AssertionError(layout)


def to_hf(spec: ModelSpec, rule: Rule, shards: list[torch.Tensor]) -> list[torch.Tensor]:
    """The HF tensors of `rule` rebuilt from every tp rank's shard, in tp-rank order."""
    import torch
    layout = rule.layout
    if layout is Layout.REPLICATED:
        return [shards[0]]
    if layout is Layout.VOCAB:
        return [torch.cat(shards, dim=0)[: spec.vocab_size]]
    if layout is Layout.ROW:
        return [torch.cat(shards, dim=1)]
    if layout is Layout.GATED_FC1:
        halves = [s.chunk(2, dim=0) for s in shards]
        return [torch.cat([g for g, _ in halves]), torch.cat([u for _, u in halves])]
    if layout is Layout.QKV:
        g, hd, qpg = spec.num_kv_heads, spec.head_dim, spec.heads_per_group
        rest = shards[0].shape[1:]
        grouped = torch.cat(shards, dim=0).reshape(g, (qpg + 2) * hd, *rest)
        q, k, v = grouped.split([qpg * hd, hd, hd], dim=1)
        return [q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)]
    raise AssertionError(layout)
