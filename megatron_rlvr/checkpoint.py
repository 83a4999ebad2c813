"""The Megatron checkpoint: what the trainer saves and resumes from, and what conversion writes.

Format: Megatron-Core distributed checkpointing (`torch_dist`) of the model's `sharded_state_dict()`.
Every tensor is stored with its global shape and each rank's slice of it, so a checkpoint written at
one TP/PP/CP/DP layout loads at any other without a conversion step. Beside the shards:

    <dir>/hf/config.json (+ tokenizer, generation config)   the model's identity; makes a checkpoint
                                                              self-contained for `mcore-to-hf`
    <dir>/megatron_rlvr.json   format version, parameter dtype, layout it was written at
    <dir>/extra.pt             the caller's small picklable dict (step, sampler position, RNG, ...)
    <dir>/COMPLETE             written last; a directory without it is never loaded

A checkpoint is written into `<dir>.incomplete` and renamed to `<dir>` once every rank has
finished, so a crash mid-save leaves no directory that `latest_checkpoint` would pick.

Optimizer state (Megatron's distributed optimizer) is saved in its `fully_reshardable` format:
each parameter's Adam moments and fp32 master copy are stored like the parameter itself (global
shape, per-rank slices), so it also reshards across TP, PP and DP on load (tested from TP2×PP2 to
DP2×CP2). Megatron writes that format by first all-gathering every data-parallel rank's optimizer
shard, so every rank would hold the fp32 state of its whole model-parallel slice (3 × 4 bytes a
parameter) at once: the first save of a Qwen3-0.6B at TP2 was OOM-killed on a 24 GiB machine. We
write the same tensors without the gather (`_param_state_by_owner`): each parameter's state is
written by the one data-parallel rank that holds it, straight from the optimizer's own tensors
(views, no copy); only a parameter split between data-parallel ranks is assembled, on the rank
holding most of it (point-to-point, one parameter at a time). The files are Megatron's, so loading
is Megatron's own code. One exception: Megatron stores the optimizer state of the embedding and output
layer at their padded vocabulary size, so when `vocab_size` is not divisible by both TP sizes the
optimizer state only loads at a TP size with the same padding (model weights always load).

Transformer-Engine's layers add `_extra_state` entries (FP8 metadata) that Megatron's local layers
do not all have; loading tolerates exactly those keys missing or unexpected, so a checkpoint written
on a CPU loads into a TE model and vice versa. Any other key mismatch is an error.

All paths must be on a file system every rank sees (as Megatron's own checkpoints require).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil

import torch
import torch.distributed as dist

from megatron_rlvr.models.hf_checkpoint import CheckpointError
from megatron_rlvr.models.spec import ModelSpec, read_model_spec

FORMAT = "megatron-rlvr/torch_dist"
FORMAT_VERSION = 1
META_FILE = "megatron_rlvr.json"
EXTRA_FILE = "extra.pt"
COMPLETE_MARKER = "COMPLETE"
HF_SUBDIR = "hf"
INCOMPLETE_SUFFIX = ".incomplete"
_STEP_DIR = re.compile(r"^step_(\d+)$")
# Files of an HF checkpoint directory that are weights, not identity: never copied.
_WEIGHT_FILE = re.compile(r"(\.safetensors|\.bin|\.pt|\.pth|\.safetensors\.index\.json|"
                          r"\.bin\.index\.json)$")
# Fields that do not change which tensors a model has or what they mean.
_IDENTITY_EXEMPT = ("torch_dtype",)
_METADATA = {
    # Adam moments and master weights per parameter, like the parameters: reshardable on load.
    # ("fully_sharded_model_space" would avoid the gather but Megatron-Core 0.16 no longer
    # supports the flattened tensors it is made of.)
    "distrib_optim_sharding_type": "fully_reshardable",
    "chained_optim_avoid_prefix": True,
    "singleton_local_shards": False,
}


# --------------------------------------------------------------------------------- directories

def step_dir(root: str, step: int) -> str:
    """Where the trainer keeps the checkpoint of `step`: `<root>/step_000010`."""
    return os.path.join(root, f"step_{step:06d}")


def is_complete(ckpt_dir: str) -> bool:
    return os.path.isfile(os.path.join(ckpt_dir, COMPLETE_MARKER))


def latest_checkpoint(root: str) -> str | None:
    """The complete `step_*` checkpoint with the highest step under `root`, or None.

    Half-written checkpoints (`step_*.incomplete`, or a directory without the marker) are ignored.
    """
    if not os.path.isdir(root):
        return None
    best = None
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        path = os.path.join(root, name)
        if m and is_complete(path) and (best is None or int(m.group(1)) > best[0]):
            best = (int(m.group(1)), path)
    return best[1] if best else None


def copy_hf_metadata(src_dir: str, dst_dir: str) -> list[str]:
    """Copy config.json, tokenizer and generation files (everything but weights) from an HF
    checkpoint directory; returns the copied file names."""
    os.makedirs(dst_dir, exist_ok=True)
    copied = []
    for name in sorted(os.listdir(src_dir)):
        path = os.path.join(src_dir, name)
        if os.path.isfile(path) and not _WEIGHT_FILE.search(name):
            shutil.copy2(path, os.path.join(dst_dir, name))
            copied.append(name)
    return copied


# ----------------------------------------------------------------------------------- identity

def read_info(ckpt_dir: str) -> dict:
    """The checkpoint's metadata (`megatron_rlvr.json`) plus `spec` (its ModelSpec) and
    `hf_dir` (where its config.json and tokenizer live); clear errors for anything else."""
    if not os.path.isdir(ckpt_dir):
        raise CheckpointError(f"{ckpt_dir}: no such Megatron checkpoint directory")
    meta_path = os.path.join(ckpt_dir, META_FILE)
    if not os.path.isfile(meta_path):
        if os.path.isfile(os.path.join(ckpt_dir, "config.json")):
            raise CheckpointError(f"{ckpt_dir} looks like a Hugging Face checkpoint, not a Megatron "
                                  "checkpoint written by megatron-rlvr (no megatron_rlvr.json)")
        raise CheckpointError(f"{ckpt_dir}: not a megatron-rlvr checkpoint (no {META_FILE})")
    if not is_complete(ckpt_dir):
        raise CheckpointError(f"{ckpt_dir}: checkpoint is incomplete (no {COMPLETE_MARKER} "
                              "marker); the save that wrote it did not finish")
    try:
        with open(meta_path, encoding="utf-8") as f:
            info = json.load(f)
    except ValueError as e:  # bad JSON or undecodable bytes
        raise CheckpointError(f"{meta_path}: malformed checkpoint metadata ({e})") from None
    if not isinstance(info, dict):
        raise CheckpointError(f"{meta_path}: malformed checkpoint metadata (a JSON object "
                              f"expected, found {type(info).__name__})")
    version = info.get("version", 0)
    if info.get("format") != FORMAT or not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{ckpt_dir}: format {info.get('format')!r} version "
                              f"{info.get('version')!r}; this code reads {FORMAT} up to version "
                              f"{FORMAT_VERSION}")
    layout = info.get("saved_layout")
    if info.get("params_dtype") not in ("float32", "bfloat16", "float16") \
            or not isinstance(info.get("has_optimizer"), bool) or not isinstance(layout, dict) \
            or not all(isinstance(layout.get(k), int) and not isinstance(layout.get(k), bool)
                       and layout[k] >= 1 for k in ("tp", "pp", "cp", "dp")):
        raise CheckpointError(f"{meta_path}: malformed checkpoint metadata (params_dtype, "
                              "has_optimizer or saved_layout missing or invalid)")
    info["hf_dir"] = os.path.join(ckpt_dir, HF_SUBDIR)
    info["spec"] = read_model_spec(info["hf_dir"])
    check_stored_tensors(ckpt_dir, info)
    return info


def _expected_global_shapes(spec: ModelSpec, saved_tp: int) -> dict[str, tuple[int, ...]]:
    """Global shapes of the main Megatron tensors for `spec` (layers stacked), with the vocabulary
    padded as it was at the tensor-parallel size the checkpoint was saved at."""
    L, h, hd, ffn = spec.num_layers, spec.hidden_size, spec.head_dim, spec.ffn_hidden_size
    vocab = spec.padded_vocab_size(saved_tp)
    shapes = {
        "embedding.word_embeddings.weight": (vocab, h),
        "decoder.final_layernorm.weight": (h,),
        "decoder.layers.self_attention.linear_qkv.weight":
            (L, (spec.num_heads + 2 * spec.num_kv_heads) * hd, h),
        "decoder.layers.self_attention.linear_proj.weight": (L, h, spec.num_heads * hd),
        "decoder.layers.mlp.linear_fc1.weight": (L, 2 * ffn, h),
        "decoder.layers.mlp.linear_fc2.weight": (L, h, ffn),
    }
    if not spec.tie_embeddings:
        shapes["output_layer.weight"] = (vocab, h)
    return shapes


def check_stored_tensors(ckpt_dir: str, info: dict) -> None:
    """Before anything is built or loaded: the stored tensors agree with the checkpoint's
    config.json (a vocabulary that no longer matches would be dropped or zero-padded silently),
    every shard file the index lists is there and long enough, and extra.pt is readable."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(ckpt_dir).read_metadata()
        stored = {k: tuple(v.size) for k, v in metadata.state_dict_metadata.items()
                  if hasattr(v, "size")}
        storage = list(metadata.storage_data.values())
    except Exception as e:  # torch raises several types for a damaged index
        raise CheckpointError(f"{ckpt_dir}: cannot read the tensor index (.metadata): "
                              f"{type(e).__name__}: {e}") from None
    spec = info["spec"]
    for key, shape in _expected_global_shapes(spec, info["saved_layout"]["tp"]).items():
        if key not in stored:
            raise CheckpointError(f"{ckpt_dir}: its tensors do not fit its {HF_SUBDIR}/config.json "
                                  f"({describe(spec)}): tensor {key} is not stored")
        if stored[key] != shape:
            raise CheckpointError(f"{ckpt_dir}: its tensors do not fit its {HF_SUBDIR}/config.json "
                                  f"({describe(spec)}): tensor {key} is stored with shape "
                                  f"{list(stored[key])}, the config needs {list(shape)}")
    ends: dict[str, int] = {}
    for item in storage:
        ends[item.relative_path] = max(ends.get(item.relative_path, 0), item.offset + item.length)
    for name, end in sorted(ends.items()):
        path = os.path.join(ckpt_dir, name)
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: shard file missing from the checkpoint")
        if os.path.getsize(path) < end:
            raise CheckpointError(f"{path}: shard file truncated ({os.path.getsize(path)} "
                                  f"bytes, its index needs {end})")
    try:
        extra = torch.load(os.path.join(ckpt_dir, EXTRA_FILE), weights_only=False)
    except Exception as e:  # unpickling raises many types
        raise CheckpointError(f"{os.path.join(ckpt_dir, EXTRA_FILE)}: unreadable "
                              f"({type(e).__name__}: {e})") from None
    if not isinstance(extra, dict):
        raise CheckpointError(f"{os.path.join(ckpt_dir, EXTRA_FILE)}: malformed (a dict expected, "
                              f"found {type(extra).__name__})")


def describe(spec: ModelSpec) -> str:
    return (f"{spec.architecture} ({spec.num_layers} layers, hidden {spec.hidden_size}, "
            f"{spec.num_heads}/{spec.num_kv_heads} heads, vocab {spec.vocab_size}, "
            f"tied={spec.tie_embeddings})")


def check_same_model(ckpt_dir: str, saved: ModelSpec, loading: ModelSpec) -> None:
    """Refuse to load a checkpoint into a model it was not written from, naming the differences."""
    a, b = dataclasses.asdict(saved), dataclasses.asdict(loading)
    diffs = [f"{k}: {a[k]!r} in the checkpoint, {b[k]!r} in the model"
             for k in a if k not in _IDENTITY_EXEMPT and a[k] != b[k]]
    if diffs:
        raise CheckpointError(f"{ckpt_dir}: checkpoint is for model {describe(saved)}, you are "
                              f"loading {describe(loading)}; differences: " + "; ".join(diffs))


# ---------------------------------------------------------------------------- save and load

def _single_module(model_chunks):
    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    if len(chunks) != 1:
        raise NotImplementedError("checkpoints of virtual pipeline stages (several model chunks "
                                  "per rank) are not supported")
    module = chunks[0]
    while hasattr(module, "module"):  # Megatron DDP (and Float16Module) wrap the GPTModel
        module = module.module
    return module


def _sharded_state(module, optimizer, *, is_loading: bool) -> dict:
    from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

    metadata = ensure_metadata_has_dp_cp_group(dict(_METADATA))
    state = {"model": module.sharded_state_dict(metadata=metadata)}
    if optimizer is not None:
        state["optimizer"] = _optimizer_sharded_state(optimizer, state["model"],
                                                      is_loading=is_loading, metadata=metadata)
    return state


# How the optimizer state is saved: "by_owner" (ours, no gather) or "gather" (Megatron's own
# `fully_reshardable` save; kept for benchmarks/checkpoint_memory.py). Both write the same tensors.
OPTIMIZER_SAVE = "by_owner"
_OPTIMIZER_STATE_KEYS = ("param", "exp_avg", "exp_avg_sq")


def _distributed_optimizers(optimizer):
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return [o for o in getattr(optimizer, "chained_optimizers", [optimizer])
            if isinstance(o, DistributedOptimizer)]


def _optimizer_sharded_state(optimizer, model_state, *, is_loading: bool, metadata: dict):
    """Megatron's optimizer sharded state dict; when saving, with the parameter state built by
    `_param_state_by_owner` instead of Megatron's gather (for this call only)."""
    patched = [] if is_loading or OPTIMIZER_SAVE == "gather" else _distributed_optimizers(optimizer)
    for opt in patched:
        opt.sharded_param_state_fully_reshardable = (
            lambda model_sd, is_loading=False, metadata=None, opt=opt:
            _param_state_by_owner(opt, model_sd, metadata))
    try:
        return optimizer.sharded_state_dict(model_state, is_loading=is_loading, metadata=metadata)
    finally:
        for opt in patched:
            del opt.sharded_param_state_fully_reshardable


def _is_dp_replica_triple(replica_id) -> bool:
    return isinstance(replica_id, tuple) and len(replica_id) == 3


def _dp_owner_replica_id(replica_id) -> tuple:
    """The model parameter's replica id with its data-parallel component (the last one, by
    Megatron's convention `(copy, tp replica, dp_cp rank)`) made main: this rank writes it."""
    return (*replica_id[:-1], 0)


def _param_state_by_owner(opt, model_sharded_state_dict, metadata):
    """`DistributedOptimizer.sharded_param_state_fully_reshardable` for saving, without its gather.

    Megatron's version all-gathers every data-parallel rank's flat fp32 buffers (master weights and
    both Adam moments) into whole-buffer CPU tensors on every rank, then cuts them into
    parameter-shaped tensors that only data-parallel rank 0 writes. Here each parameter's state is
    written by the data-parallel rank that holds it (the one holding most of it when the
    distributed optimizer splits it between ranks), with the same keys, shapes, dtypes and
    model-parallel replica ids, so the checkpoint is the same and Megatron's loader reads it.
    A parameter held whole is a view of the optimizer's tensors; only split parameters are
    assembled, by point-to-point transfers of their pieces, one state tensor at a time (moved to
    the host, as Megatron's world buffers are).
    """
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
    from megatron.core.dist_checkpointing.utils import extract_sharded_tensors_and_factories

    group = opt.data_parallel_group
    dp_size, dp_rank = group.size(), group.rank()
    global_ranks = dist.get_process_group_ranks(group)
    model_sd, _ = extract_sharded_tensors_and_factories(model_sharded_state_dict)
    sharded_of = {sh.data: sh for sh in nested_values(model_sd)}

    # The plan: the same on every data-parallel rank (the buffers' layout is identical).
    plan = []  # (param_idx, model_param, sharded metadata, owner, {rank: (start, end) in param})
    param_idx = 0
    for gbuf_idx, gbuf_range_maps in enumerate(opt.gbuf_ranges):
        buffer = opt.buffers[gbuf_idx]
        assert len(gbuf_range_maps) == 1, "single dtype supported, for now."
        for model_param, (start, end, bucket_id) in buffer.param_index_map.items():
            sharded = sharded_of.get(model_param)
            if sharded is None:
                raise ValueError(f"Model param {model_param.shape} not in model_sharded_state_dict")
            assert sharded.flattened_range is None, f"Flattened model tensor ({sharded})"
            bucket = buffer.buckets[bucket_id]
            local = bucket.grad_data.numel() // dp_size
            pieces = {}
            for r in range(dp_size):
                lo = max(start, bucket.offset + r * local)
                hi = min(end, bucket.offset + (r + 1) * local)
                if lo < hi:
                    pieces[r] = (lo - start, hi - start)
            owner = max(pieces, key=lambda r: (pieces[r][1] - pieces[r][0], -r))
            plan.append((param_idx, model_param, sharded, owner, pieces))
            param_idx += 1
    if not all(_is_dp_replica_triple(sharded.replica_id) for _, _, sharded, _, _ in plan):
        # Not Megatron's (copy, tp, dp) convention (not met in our dense models): its own save.
        # Decided before any transfer, alike on every DP rank (the replica ids' shape is).
        return type(opt).sharded_param_state_fully_reshardable(
            opt, model_sharded_state_dict, False, metadata)

    state = {}
    for param_idx, model_param, sharded, owner, pieces in plan:
        if dp_rank not in pieces:
            continue
        mine = opt._get_main_param_and_optimizer_states(model_param)
        flat = {}
        for key in _OPTIMIZER_STATE_KEYS:
            own = mine[key].detach()
            if len(pieces) == 1:
                flat[key] = own.view(-1)
            elif dp_rank == owner:
                full = torch.empty(model_param.numel(), dtype=own.dtype, device=own.device)
                for r, (lo, hi) in sorted(pieces.items()):
                    if r == dp_rank:
                        full[lo:hi].copy_(own.view(-1))
                    else:
                        dist.recv(full[lo:hi], src=global_ranks[r], group=group)
                flat[key] = full.cpu()  # off the accelerator, as Megatron's world buffers
                del full
            else:
                dist.send(own.contiguous().view(-1), dst=global_ranks[owner], group=group)
        if dp_rank != owner:
            continue
        replica_id = _dp_owner_replica_id(sharded.replica_id)
        tensors = {}
        for key, t in flat.items():
            assert t.numel() == model_param.numel(), (sharded.key, key, t.numel())
            t = t.view(sharded.data.shape)
            kwargs = dict(key=f"optimizer.state.{key}.{sharded.key}", data=t, dtype=t.dtype,
                          replica_id=replica_id)
            if isinstance(sharded, ShardedTensorFactory):
                kwargs.pop("dtype")
            tensors[key] = dataclasses.replace(sharded, **kwargs)
            tensors[key].validate_metadata_integrity()
        state[param_idx] = tensors
    return state


def _torch_adams(optimizer):
    """The torch Adam(W) instances inside a Megatron optimizer: its fallback when neither
    Transformer-Engine nor Apex is installed (as on CPU)."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(opt.optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            yield opt.optimizer


def _prepare_adam_for_load(optimizer) -> None:
    """Give a torch Adam that has never stepped its zero state: Megatron's distributed optimizer
    reads the step count from it when building the state to load into (and then overwrites it)."""
    for adam in _torch_adams(optimizer):
        for group in adam.param_groups:
            for p in group["params"]:
                if not adam.state[p]:
                    adam.state[p].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p),
                                         exp_avg_sq=torch.zeros_like(p))


def _unshare_adam_steps(optimizer) -> None:
    """Megatron's load gives every parameter of a torch Adam the *same* `step` tensor; Adam
    increments it in place once per parameter, so from the second step on each parameter would
    see a different, wrong bias correction. Give each parameter its own copy."""
    for adam in _torch_adams(optimizer):
        for state in adam.state.values():
            if "step" in state:
                state["step"] = state["step"].clone()


def _layout() -> dict:
    from megatron.core import parallel_state as ps
    return {"tp": ps.get_tensor_model_parallel_world_size(),
            "pp": ps.get_pipeline_model_parallel_world_size(),
            "cp": ps.get_context_parallel_world_size(),
            "dp": ps.get_data_parallel_world_size()}


def save_checkpoint(ckpt_dir: str, model_chunks, *, hf_dir: str, optimizer=None,
                    extra: dict | None = None, overwrite: bool = False) -> str:
    """Save this rank's model (and optimizer) shards into `ckpt_dir`, atomically. A collective.

    `hf_dir` is the HF checkpoint (or a checkpoint's `hf/` directory) whose config.json and
    tokenizer files describe the model; they are stored inside the checkpoint. `extra` is saved
    by rank 0. An existing `ckpt_dir` is an error unless `overwrite`.
    """
    from megatron.core import dist_checkpointing

    module = _single_module(model_chunks)
    ckpt_dir = os.path.abspath(ckpt_dir)
    tmp = ckpt_dir + INCOMPLETE_SUFFIX
    if os.path.exists(ckpt_dir) and not overwrite:
        raise FileExistsError(f"{ckpt_dir} already exists; pass overwrite=True (--overwrite) "
                              "to replace it")
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        raise CheckpointError(f"{hf_dir}: no config.json to store with the checkpoint")
    params_dtype = str(next(module.parameters()).dtype).removeprefix("torch.")
    rank0 = dist.get_rank() == 0
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)  # a previous crashed save
        os.makedirs(tmp)
    dist.barrier()
    # Megatron-Core's save needs the target directory to exist before it starts (made above).
    dist_checkpointing.save(_sharded_state(module, optimizer, is_loading=False), tmp)
    if rank0:
        copy_hf_metadata(hf_dir, os.path.join(tmp, HF_SUBDIR))
        torch.save(dict(extra or {}), os.path.join(tmp, EXTRA_FILE))
        with open(os.path.join(tmp, META_FILE), "w") as f:
            json.dump({"format": FORMAT, "version": FORMAT_VERSION, "params_dtype": params_dtype,
                       "saved_layout": _layout(), "has_optimizer": optimizer is not None},
                      f, indent=2)
        with open(os.path.join(tmp, COMPLETE_MARKER), "w") as f:
            f.write("ok\n")
        replace_dir(tmp, ckpt_dir)
    dist.barrier()
    return ckpt_dir


EXTRA_STATE_SUFFIX = "_extra_state"


def _only_extra_state(ckpt_dir: str, spec: ModelSpec, what: str, keys) -> None:
    """Transformer-Engine layers have `_extra_state` entries (FP8 metadata) that Megatron's local
    layers do not all have: only those may differ between the checkpoint and the model."""
    other = sorted(k for k in keys if not k.endswith(EXTRA_STATE_SUFFIX))
    if other:
        raise CheckpointError(f"{ckpt_dir}: its tensors do not fit {describe(spec)} at layout "
                              f"{_layout()}: {len(other)} keys {what}: {', '.join(other[:8])}"
                              + (" ..." if len(other) > 8 else ""))


def replace_dir(src: str, dst: str) -> None:
    """Rename `src` to `dst`, replacing an existing `dst` only after `src` is complete."""
    if os.path.exists(dst):
        old = dst + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(dst, old)
        os.rename(src, dst)
        shutil.rmtree(old)
    else:
        os.rename(src, dst)


def load_checkpoint(ckpt_dir: str, model_chunks, *, spec: ModelSpec, optimizer=None) -> dict:
    """Load the checkpoint into this rank's model at the current layout; returns the `extra` dict.
    A collective. The model must be the one the checkpoint was written from.

    With `optimizer`: its state (Adam moments, step, master weights) is loaded when the checkpoint
    has one; a checkpoint without (a converted HF model) leaves it fresh, with its master weights
    refreshed from the loaded model so the first step does not write the old weights back.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from megatron.core.dist_checkpointing.validation import StrictHandling

    info = read_info(ckpt_dir)
    check_same_model(ckpt_dir, info["spec"], spec)
    module = _single_module(model_chunks)
    with_state = optimizer if info["has_optimizer"] else None
    if with_state is not None:
        _prepare_adam_for_load(optimizer)
    try:
        # "Unexpected" in Megatron's terms: asked for by the model but absent from the checkpoint
        # (removed from the request and returned); keys only the checkpoint has are not read.
        loaded, _, absent = dist_checkpointing.load(
            _sharded_state(module, with_state, is_loading=True), ckpt_dir,
            strict=StrictHandling.RETURN_UNEXPECTED)
    except CheckpointingException as e:
        raise CheckpointError(f"{ckpt_dir}: its tensors do not fit {describe(spec)} at layout "
                              f"{_layout()}: {e}") from None
    _only_extra_state(ckpt_dir, spec, "not in the checkpoint", absent)
    result = module.load_state_dict(loaded["model"], strict=False)
    _only_extra_state(ckpt_dir, spec, "missing from the loaded state", result.missing_keys)
    _only_extra_state(ckpt_dir, spec, "not in the model", result.unexpected_keys)
    if with_state is not None:
        optimizer.load_state_dict(loaded["optimizer"])
        _unshare_adam_steps(optimizer)
    elif optimizer is not None:
        optimizer.reload_model_params()
    return torch.load(os.path.join(ckpt_dir, EXTRA_FILE), weights_only=False)
