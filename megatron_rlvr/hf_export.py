"""Export the policy as a Hugging Face checkpoint: sharded safetensors, index, config, tokenizer.

`write_hf` streams a (TP/PP-sharded) Megatron model out through the mapping
(`models.convert.iter_hf_weights`): every rank takes part in gathering each tensor, rank 0 alone
writes. The trainer's final export (`checkpoint.export_hf_at_end`) and the
`python -m checkpoint_tools.convert mcore-to-hf` CLI both call it; the CLI is a thin layer over
this module (the library never imports `checkpoint_tools`).

The shard boundaries are planned up front from the names, shapes and dtype (the mapping knows them
all before any tensor exists), so files get Hugging Face's final names
(`model-00001-of-00004.safetensors`) without renaming, and a shard is written and dropped as soon as
its last tensor arrives: peak memory is one shard, never the model. The directory is written under
a temporary name and renamed when complete (`checkpoint.replace_dir`), carrying megatron-rlvr's
marker so that `--overwrite` may replace it later.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Iterable, Iterator

import torch

INDEX_FILE = "model.safetensors.index.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def plan_shards(shapes: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype,
                max_shard_bytes: int) -> list[list[str]]:
    """Group tensor names, in order, into shards of at most `max_shard_bytes` (a bigger tensor
    gets a shard of its own)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards, current, size = [], [], 0
    for name, shape in shapes:
        nbytes = itemsize * int(torch.Size(shape).numel())
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    if current:
        shards.append(current)
    return shards


def write_sharded(stream: Iterable[tuple[str, torch.Tensor]], out_dir: str,
                  shards: list[list[str]], *, write: bool = True) -> dict:
    """Consume `stream` (it must yield exactly the planned names, in order) and write the shards
    and `model.safetensors.index.json` into `out_dir`. With `write=False` the stream is only
    consumed (the other ranks of a collective export). Returns the index."""
    from safetensors.torch import save_file

    n = len(shards)
    weight_map, total = {}, 0
    it: Iterator = iter(stream)
    for k, names in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        tensors = {}
        for expected in names:
            name, tensor = next(it)
            if name != expected:
                raise AssertionError(f"export stream yielded {name}, planned {expected}")
            if write:
                tensors[name] = tensor.contiguous()
                weight_map[name] = file
                total += tensor.numel() * tensor.element_size()
        if write:
            save_file(tensors, os.path.join(out_dir, file), metadata={"format": "pt"})
        del tensors
    leftover = next(it, None)
    if leftover is not None:
        raise AssertionError(f"export stream yielded the unplanned tensor {leftover[0]}")
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    if write:
        with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
            json.dump(index, f, indent=2)
    return index


def exported_config(src_hf_dir: str, out_dir: str, dtype_name: str) -> None:
    """Copy config and tokenizer files; record the exported dtype in config.json."""
    from megatron_rlvr.checkpoint import copy_hf_metadata

    copy_hf_metadata(src_hf_dir, out_dir)
    path = os.path.join(out_dir, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    keys = [k for k in ("torch_dtype", "dtype") if k in cfg] or ["torch_dtype"]
    if any(cfg.get(k) != dtype_name for k in keys):
        cfg.update({k: dtype_name for k in keys})
        with open(path, "w") as f:
            json.dump(cfg, f, indent=2)


def write_hf(model, spec, source_hf_dir: str, out_dir: str, *, dtype: str,
             max_shard_bytes: int = 5 * 1024 ** 3) -> str:
    """Stream this rank's model stage out as an HF checkpoint in `out_dir` (a collective; rank 0
    writes, atomically). `source_hf_dir` provides config and tokenizer files; `dtype` is one of
    `DTYPES`' names."""
    import torch.distributed as dist

    from megatron_rlvr import safety
    from megatron_rlvr.checkpoint import INCOMPLETE_SUFFIX, replace_dir
    from megatron_rlvr.models.convert import iter_hf_weights
    from megatron_rlvr.models.families import family
    from megatron_rlvr.models.mapping import hf_shapes

    shapes = [(n, s) for rule in family(spec.family).rules(spec)
              for n, s in zip(rule.hf, hf_shapes(spec, rule))]
    shards = plan_shards(shapes, DTYPES[dtype], max_shard_bytes)
    rank0 = dist.get_rank() == 0
    tmp = os.path.abspath(out_dir) + INCOMPLETE_SUFFIX
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        safety.write_marker(tmp, "HF export")  # ours: --overwrite may replace it
    stream = iter_hf_weights(model, spec, dtype=DTYPES[dtype])
    write_sharded(stream, tmp, shards, write=rank0)
    if rank0:
        exported_config(source_hf_dir, tmp, dtype)
        replace_dir(tmp, os.path.abspath(out_dir))
    dist.barrier()
    return out_dir
