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
DP2×CP2). The price: while saving, each data-parallel group first gathers its optimizer shards, so
every rank briefly holds the optimizer state of its whole model-parallel slice. One exception: Megatron stores the optimizer state of the embedding and output
layer at their padded vocabulary size, so when `vocab_size` is not divisible by both TP sizes the
optimizer state only loads at a TP size with the same padding (model weights always load).

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
            raise CheckpointError(f"{ckpt_dir}: tensor {key} is not stored; the checkpoint does "
                                  f"not hold {describe(spec)} ({HF_SUBDIR}/config.json)")
        if stored[key] != shape:
            raise CheckpointError(f"{ckpt_dir}: tensor {key} is stored with shape "
                                  f"{list(stored[key])}, but {HF_SUBDIR}/config.json "
                                  f"({describe(spec)}) needs {list(shape)}")
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
        state["optimizer"] = optimizer.sharded_state_dict(state["model"], is_loading=is_loading,
                                                          metadata=metadata)
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
        loaded = dist_checkpointing.load(_sharded_state(module, with_state, is_loading=True),
                                         ckpt_dir, strict=StrictHandling.RAISE_UNEXPECTED)
    except CheckpointingException as e:
        raise CheckpointError(f"{ckpt_dir}: its tensors do not fit {describe(spec)} at layout "
                              f"{_layout()}: {e}") from None
    module.load_state_dict(loaded["model"], strict=True)
    if with_state is not None:
        optimizer.load_state_dict(loaded["optimizer"])
        _unshare_adam_steps(optimizer)
    elif optimizer is not None:
        optimizer.reload_model_params()
    return torch.load(os.path.join(ckpt_dir, EXTRA_FILE), weights_only=False)
