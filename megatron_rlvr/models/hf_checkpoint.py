"""Read a Hugging Face safetensors checkpoint lazily, one tensor at a time, with clear errors.

Handles a single `model.safetensors` and sharded checkpoints with `model.safetensors.index.json`.
Nothing is loaded until asked for, so each pipeline stage reads only its own layers.
"""
from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, or does not match the model."""


def _check_length(file: str) -> None:
    """The file holds every byte its header lists (a truncated download has an intact header and
    fails only when its last tensors are read, after the model is built)."""
    with open(file, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
              default=0)
    size = os.path.getsize(file)
    if size < 8 + header_len + end:
        raise CheckpointError(f"{file}: truncated ({size} bytes, its header lists "
                              f"{8 + header_len + end}); download it again")


class HFCheckpoint:
    def __init__(self, path: str):
        self.path = path
        self._handles: dict[str, object] = {}
        index = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        if os.path.exists(index):
            with open(index) as f:
                try:
                    weight_map = json.load(f)["weight_map"]
                except (ValueError, KeyError, TypeError) as e:  # bad JSON or bytes, no map
                    raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
            if not isinstance(weight_map, dict) or not all(
                    isinstance(n, str) and isinstance(fn, str) and fn and os.sep not in fn
                    for n, fn in weight_map.items()):
                raise CheckpointError(f"{index}: weight_map is not a mapping of tensor names to "
                                      "file names in this directory")
            self._file_of = {name: os.path.join(path, fn) for name, fn in weight_map.items()}
        elif os.path.exists(single):
            self._file_of = {name: single for name in self._open(single).keys()}
        else:
            raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")

    def _open(self, file: str):
        if file not in self._handles:
            if not os.path.exists(file):
                raise CheckpointError(f"{file}: listed in the index but missing")
            try:
                self._handles[file] = safe_open(file, framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types for bad headers
                raise CheckpointError(f"{file}: cannot read safetensors header ({e}); "
                                      "is the file truncated or not a safetensors file?") from None
            _check_length(file)
        return self._handles[file]

    def names(self) -> set[str]:
        return set(self._file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open(self._file(name)).get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """The stored dtype as safetensors names it: F32, BF16, F16, I64, BOOL, F8_E4M3, ..."""
        return str(self._open(self._file(name)).get_slice(name).get_dtype())

    def _file(self, name: str) -> str:
        try:
            return self._file_of[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: tensor {name!r} is not in the checkpoint") from None

    def get(self, name: str) -> torch.Tensor:
        file = self._file(name)
        try:
            return self._open(file).get_tensor(name)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{file}: cannot read tensor {name!r} ({e}); "
                                  "the file may be truncated") from None
