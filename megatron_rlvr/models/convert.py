"""Hugging Face weights into this rank's Megatron shards, and the shards back out as HF tensors.

`load_hf_weights` fills the parameters this rank holds (its pipeline stage, its tensor-parallel
slice) straight from the safetensors files. `iter_hf_weights` is its inverse as a stream: every
rank walks the same fixed list of parameters; the owning stage gathers the tensor-parallel shards of
one parameter, rebuilds the HF tensors and broadcasts them along the pipeline group, so each rank
sees every full HF tensor one at a time and never a second copy of the model. Weight sync to vLLM
and checkpoint export both consume this stream.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.distributed as dist

from megatron_rlvr.models.families import family
from megatron_rlvr.models.families.base import EMBEDDING, OUTPUT
from megatron_rlvr.models.hf_checkpoint import CheckpointError, HFCheckpoint
from megatron_rlvr.models.mapping import Layout, Rule, hf_shapes, to_hf, to_megatron_shard
from megatron_rlvr.models.spec import ModelSpec

# HF checkpoints sometimes carry these; they are derived, not learned.
_IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq",)
_TIED_OUTPUT = Rule(OUTPUT.megatron, EMBEDDING.hf, Layout.VOCAB)


def expected_hf_names(spec: ModelSpec) -> list[str]:
    return [n for rule in family(spec.family).rules(spec) for n in rule.hf]


def check_checkpoint_names(spec: ModelSpec, ckpt: HFCheckpoint) -> None:
    """Every expected tensor present, none unexpected: name them all in one error."""
    expected = set(expected_hf_names(spec))
    found = {n for n in ckpt.names() if not n.endswith(_IGNORABLE_SUFFIXES)}
    if spec.tie_embeddings:
        found.discard("lm_head.weight")  # some tied checkpoints store the copy anyway
    missing, extra = sorted(expected - found), sorted(found - expected)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s): {', '.join(missing[:8])}"
                         + (" ..." if len(missing) > 8 else ""))
        if extra:
            parts.append(f"unexpected {len(extra)} tensor(s): {', '.join(extra[:8])}"
                         + (" ..." if len(extra) > 8 else ""))
        raise CheckpointError(f"{ckpt.path} does not match {spec.architecture} "
                              f"({spec.num_layers} layers): " + "; ".join(parts))


# What a weight may be stored as: floating point that converts exactly to our parameter dtypes.
# (Integer or boolean tensors are not weights; fp8 ones need scales this loader does not apply.)
FLOAT_DTYPES = ("F64", "F32", "BF16", "F16")


def check_floating(ckpt: HFCheckpoint, names) -> None:
    """Every tensor in `names` is stored in a floating dtype; name the first that is not."""
    for name in names:
        stored = ckpt.dtype(name)
        if stored not in FLOAT_DTYPES:
            raise CheckpointError(f"{ckpt.path}: tensor {name} is stored as {stored}; weights "
                                  f"must be floating point ({', '.join(FLOAT_DTYPES)})")


def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


# Transformer-Engine's layer spec (GPU) fuses the pre-attention and pre-MLP norms into the linear
# layer that follows them; we name those weights as the local spec does, so one rule table serves
# both (Megatron's own checkpoints map the same pairs: `sharded_state_dict_keys_map`).
_TE_FUSED_NORMS = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}


def canonical_layer_param(rest: str) -> str:
    """A layer parameter's name (after `decoder.layers.<i>.`) as the local spec spells it."""
    return _TE_FUSED_NORMS.get(rest, rest)


def _local_params(model) -> dict[str, torch.nn.Parameter]:
    """This stage's parameters keyed by their global Megatron names (global layer numbers)."""
    model = _unwrap(model)
    out = {}
    local_to_global = {}
    if hasattr(model, "decoder"):
        for j, layer in enumerate(model.decoder.layers):
            local_to_global[j] = layer.layer_number - 1
    for name, p in model.named_parameters():
        if name.startswith("decoder.layers."):
            _, _, j, rest = name.split(".", 3)
            name = f"decoder.layers.{local_to_global[int(j)]}.{canonical_layer_param(rest)}"
        out[name] = p
    return out


def _tp():
    from megatron.core import parallel_state
    return (parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_tensor_model_parallel_group())


def load_hf_weights(model, spec: ModelSpec, hf_dir: str | HFCheckpoint) -> None:
    """Copy the HF checkpoint's tensors into this rank's shards of `model`."""
    ckpt = hf_dir if isinstance(hf_dir, HFCheckpoint) else HFCheckpoint(hf_dir)
    check_checkpoint_names(spec, ckpt)
    tp_rank, tp, _ = _tp()
    rules = {r.megatron: r for r in family(spec.family).rules(spec)}
    if spec.tie_embeddings:
        rules[_TIED_OUTPUT.megatron] = _TIED_OUTPUT  # the last stage's copy of the embedding
    params = _local_params(model)
    for name, param in params.items():
        rule = rules.get(name)
        if rule is None:
            raise CheckpointError(f"Megatron parameter {name} has no Hugging Face source "
                                  f"in the {spec.family} mapping")
        tensors = []
        for hf_name, shape in zip(rule.hf, hf_shapes(spec, rule)):
            found = ckpt.shape(hf_name)
            if found != shape:
                raise CheckpointError(f"{ckpt.path}: tensor {hf_name} has shape {list(found)}, "
                                      f"expected {list(shape)} for {spec.architecture}")
            tensor = ckpt.get(hf_name)
            if not tensor.is_floating_point() or tensor.dtype.itemsize < 2:
                raise CheckpointError(f"{ckpt.path}: tensor {hf_name} is stored as "
                                      f"{tensor.dtype}; weights must be floating point "
                                      f"({', '.join(FLOAT_DTYPES)})")
            tensors.append(tensor)
        shard = to_megatron_shard(spec, rule, tensors, tp_rank, tp)
        if shard.shape != param.shape:
            raise AssertionError(f"{name}: built shard {tuple(shard.shape)} but the model "
                                 f"holds {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(shard.to(param.dtype))


def _owner_stage(spec: ModelSpec, rule: Rule, pp: int) -> int:
    if rule.megatron.startswith("embedding."):
        return 0
    if rule.megatron.startswith("decoder.layers."):
        return int(rule.megatron.split(".")[2]) // (spec.num_layers // pp)
    return pp - 1


def iter_hf_weights(model, spec: ModelSpec, *, include_tied_lm_head: bool = False,
                    dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(hf_name, full_tensor)` for the whole model on every rank, in a fixed order.

    A collective: every rank of the model-parallel group must consume the stream to the end.
    `include_tied_lm_head` also yields `lm_head.weight` (the embedding) for tied models, which
    inference engines that keep a separate output layer want.
    """
    from megatron.core import parallel_state

    tp_rank, tp, tp_group = _tp()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    stage = parallel_state.get_pipeline_model_parallel_rank()
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    pp_ranks = dist.get_process_group_ranks(pp_group) if pp > 1 else None
    params = _local_params(model)
    some = next(iter(params.values()))
    out_dtype, device = dtype or some.dtype, some.device

    for rule in family(spec.family).rules(spec):
        owner = _owner_stage(spec, rule, pp)
        if owner == stage:
            shard = params[rule.megatron].detach()
            if tp > 1:
                shards = [torch.empty_like(shard) for _ in range(tp)]
                dist.all_gather(shards, shard.contiguous(), group=tp_group)
            else:
                shards = [shard]
            tensors = [t.to(out_dtype).contiguous() for t in to_hf(spec, rule, shards)]
        else:
            tensors = [torch.empty(s, dtype=out_dtype, device=device)
                       for s in hf_shapes(spec, rule)]
        if pp > 1:
            for t in tensors:
                dist.broadcast(t, src=pp_ranks[owner], group=pp_group)
        yield from zip(rule.hf, tensors)
        if rule is EMBEDDING and spec.tie_embeddings and include_tied_lm_head:
            yield "lm_head.weight", tensors[0]
