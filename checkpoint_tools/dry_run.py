"""Check our HF <-> Megatron mapping on a real config without allocating a single weight.

For every (pipeline stage, tensor-parallel rank) of a TP×PP layout, the family's rules turn meta
HF tensors (`torch.empty(shape, device="meta")`) into this rank's Megatron shard; its shape must
equal what Megatron-Core's parallel layers allocate (the formulas in `megatron_shape`, which the
torchrun tests compare with real GPTModel stages), and `to_hf` over the TP ranks' shards must give
back the HF shapes. The HF names and shapes the rules produce must equal those of the transformers
model built on the meta device from the same config, and the per-rank parameter counts, summed over
the layout (less vocabulary padding and the tied output copy), must equal its parameter count.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megatron_rlvr.models.families import family
from megatron_rlvr.models.families.base import EMBEDDING, OUTPUT
from megatron_rlvr.models.mapping import Layout, Rule, hf_shapes, to_hf, to_megatron_shard
from megatron_rlvr.models.spec import ModelSpec, check_layout

_TIED_OUTPUT = Rule(OUTPUT.megatron, EMBEDDING.hf, Layout.VOCAB)


def megatron_shape(spec: ModelSpec, name: str, tp: int) -> tuple[int, ...]:
    """The shape Megatron-Core gives parameter `name` on one of `tp` ranks (TransformerConfig
    formulas: ColumnParallelLinear splits dim 0, RowParallelLinear dim 1, embeddings by rows)."""
    h, hd, f = spec.hidden_size, spec.head_dim, spec.ffn_hidden_size
    qkv = (spec.num_heads + 2 * spec.num_kv_heads) * hd
    if name in (EMBEDDING.megatron, OUTPUT.megatron):
        return (spec.padded_vocab_size(tp) // tp, h)
    if name.endswith("linear_qkv.weight"):
        return (qkv // tp, h)
    if name.endswith("linear_qkv.bias"):
        return (qkv // tp,)
    if name.endswith("linear_proj.weight"):
        return (h, spec.num_heads * hd // tp)
    if name.endswith("linear_fc1.weight"):
        return (2 * f // tp, h)
    if name.endswith("linear_fc2.weight"):
        return (h, f // tp)
    if name.endswith(("q_layernorm.weight", "k_layernorm.weight")):
        return (hd,)
    if name.endswith("layernorm.weight"):
        return (h,)
    raise KeyError(f"no Megatron shape formula for {name}")


def stage_rules(spec: ModelSpec, pp: int, stage: int) -> list[Rule]:
    """The Megatron parameters pipeline stage `stage` holds (with the tied output copy that
    Megatron keeps on the last stage when the embedding lives on another one)."""
    per = spec.num_layers // pp
    lo, hi = stage * per, (stage + 1) * per
    out = []
    for rule in family(spec.family).rules(spec):
        if rule.megatron.startswith("decoder.layers."):
            keep = lo <= int(rule.megatron.split(".")[2]) < hi
        elif rule is EMBEDDING:
            keep = stage == 0
        else:
            keep = stage == pp - 1
        if keep:
            out.append(rule)
    if spec.tie_embeddings and pp > 1 and stage == pp - 1:
        out.append(_TIED_OUTPUT)
    return out


@dataclass
class DryRunReport:
    tp: int
    pp: int
    stage_params: list[int]            # parameters held by one TP rank of each stage
    hf_names: dict[str, tuple]          # every HF name the rules produce -> its shape
    missing: list[str] = field(default_factory=list)   # in transformers' model, not produced
    extra: list[str] = field(default_factory=list)     # produced, not in transformers' model
    shape_errors: list[str] = field(default_factory=list)
    hf_params: int = 0                  # transformers' meta model count
    megatron_total: int = 0             # sum over ranks, less padding and the tied copy

    @property
    def ok(self) -> bool:
        return not (self.missing or self.extra or self.shape_errors) \
            and self.megatron_total == self.hf_params


def transformers_meta_shapes(config: dict) -> tuple[dict[str, tuple], int]:
    """Names, shapes and parameter count of the transformers model for `config`, on meta."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**{k: v for k, v in config.items()
                                  if k not in ("transformers_version",)})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    if config.get("tie_word_embeddings", False):
        shapes.pop("lm_head.weight", None)  # the embedding itself, not a tensor of its own
    return shapes, sum(p.numel() for p in model.parameters())


def dry_run(spec: ModelSpec, config: dict, tp: int, pp: int) -> DryRunReport:
    check_layout(spec, tp, pp)
    rep = DryRunReport(tp=tp, pp=pp, stage_params=[], hf_names={})
    distinct = 0  # parameters of the whole layout, replicated norms counted once
    for stage in range(pp):
        count = 0
        for rule in stage_rules(spec, pp, stage):
            shapes = hf_shapes(spec, rule)
            metas = [torch.empty(s, device="meta") for s in shapes]
            want = megatron_shape(spec, rule.megatron, tp)
            shards = [to_megatron_shard(spec, rule, metas, r, tp) for r in range(tp)]
            for r, shard in enumerate(shards):
                if tuple(shard.shape) != want:
                    rep.shape_errors.append(f"stage {stage} tp rank {r} {rule.megatron}: mapping "
                                            f"gives {tuple(shard.shape)}, Megatron has {want}")
            back = [tuple(t.shape) for t in to_hf(spec, rule, shards)]
            if back != [tuple(s) for s in shapes]:
                rep.shape_errors.append(f"{rule.megatron}: to_hf gives {back}, expected {shapes}")
            count += int(torch.Size(want).numel())
            distinct += int(torch.Size(want).numel()) * (
                1 if rule.layout is Layout.REPLICATED else tp)
            if rule is not _TIED_OUTPUT:
                rep.hf_names.update(zip(rule.hf, map(tuple, shapes)))
        rep.stage_params.append(count)

    reference, rep.hf_params = transformers_meta_shapes(config)
    rep.missing = sorted(set(reference) - set(rep.hf_names))
    rep.extra = sorted(set(rep.hf_names) - set(reference))
    rep.shape_errors += [f"{n}: mapping says {rep.hf_names[n]}, transformers has {reference[n]}"
                         for n in sorted(set(reference) & set(rep.hf_names))
                         if reference[n] != rep.hf_names[n]]
    # Megatron holds the vocabulary table padded to a multiple of tp, twice unless tied on one
    # stage (the last stage keeps its own copy of a tied embedding when pp > 1).
    padding = (spec.padded_vocab_size(tp) - spec.vocab_size) * spec.hidden_size
    tied_copy = spec.tie_embeddings and pp > 1
    tables = 1 if spec.tie_embeddings and pp == 1 else 2
    rep.megatron_total = (distinct - tables * padding
                          - tied_copy * spec.vocab_size * spec.hidden_size)
    return rep


def format_report(spec: ModelSpec, rep: DryRunReport) -> str:
    per = spec.num_layers // rep.pp
    lines = [f"dry-run: {spec.architecture} tp={rep.tp} pp={rep.pp} "
             f"(vocab {spec.vocab_size} padded to {spec.padded_vocab_size(rep.tp)})",
             f"{'stage':>5} {'layers':>9} {'params per TP rank':>20} {'GiB bf16':>9}"]
    for s, n in enumerate(rep.stage_params):
        lines.append(f"{s:>5} {f'{s * per}-{(s + 1) * per - 1}':>9} {n:>20,} "
                     f"{n * 2 / 1024 ** 3:>9.2f}")
    lines.append(f"HF tensors {len(rep.hf_names)}: missing {len(rep.missing)}, extra "
                 f"{len(rep.extra)}, shape errors {len(rep.shape_errors)}")
    for label, items in (("missing", rep.missing), ("extra", rep.extra),
                         ("shape error", rep.shape_errors)):
        lines += [f"  {label}: {x}" for x in items[:10]]
    lines.append(f"parameters: Megatron layout {rep.megatron_total:,} transformers "
                 f"{rep.hf_params:,} {'PASS' if rep.ok else 'FAIL'}")
    return "\n".join(lines)
