"""Write a stream of HF-named tensors as a sharded safetensors checkpoint, one shard in memory.

The shard boundaries are planned up front from the names, shapes and dtype (the mapping knows them
all before any tensor exists), so files get Hugging Face's final names
(`model-00001-of-00004.safetensors`) without renaming, and a shard is written and dropped as soon as
its last tensor arrives: peak memory is one shard, never the model.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Iterator

import torch
from safetensors.torch import save_file

INDEX_FILE = "model.safetensors.index.json"


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
