"""Model families: which HF architectures we convert, and their parameter name tables.

Each family lives in its own module (`llama.py`, `qwen2.py`, `qwen3.py`) and exports `FAMILY`.
Adding a Llama-style family is a new module with its rules and an entry in `FAMILIES`.
"""
from __future__ import annotations

from megatron_rlvr.models.families.base import Family
from megatron_rlvr.models.families.llama import FAMILY as LLAMA
from megatron_rlvr.models.families.qwen2 import FAMILY as QWEN2
from megatron_rlvr.models.families.qwen3 import FAMILY as QWEN3
from megatron_rlvr.models.spec import UnsupportedModelError

FAMILIES: dict[str, Family] = {f.name: f for f in (QWEN3, QWEN2, LLAMA)}


def supported_architectures() -> list[str]:
    return sorted(a for f in FAMILIES.values() for a in f.architectures)


def family_for_architecture(arch: str, where: str = "config") -> Family:
    for fam in FAMILIES.values():
        if arch in fam.architectures:
            return fam
    raise UnsupportedModelError(
        f"{where}: unsupported architecture {arch!r}; supported architectures: "
        + ", ".join(supported_architectures()))


def family(name: str) -> Family:
    return FAMILIES[name]
