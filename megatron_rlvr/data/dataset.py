"""Prompt datasets in verl's parquet schema, and a deterministic, resumable prompt sampler.

Schema, one row per problem:
    data_source     str                             which benchmark/dataset the row came from
    prompt          list of {"role", "content"}     chat messages (column name: data.prompt_key)
    reward_model    {"ground_truth": str, ...}      the reference answer
    extra_info      dict or null                    carried through untouched

Rows are validated on load: a malformed row is an error naming file, row and field, or (with
`bad_rows="skip"`) skipped and counted. Prompts are rendered with the tokenizer's chat template
(`add_generation_prompt=True`) and tokenized once, up front, so prompt-length overflow is
resolved before sampling and the sampler works over a fixed list.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import numpy as np

from megatron_rlvr.data.prompts import fit_prompts


@dataclass
class PromptRecord:
    data_source: str
    messages: list[dict[str, str]]
    ground_truth: str
    extra_info: dict[str, Any]
    prompt_ids: list[int]
    source: str  # "file:row", for error messages and debugging


@dataclass
class DatasetStats:
    rows: int = 0
    bad_rows_skipped: int = 0
    prompts_truncated: int = 0
    prompts_dropped: int = 0


class BadRow(ValueError):
    """A malformed dataset row; the message names file, row index and field."""


def _check_row(row: dict[str, Any], prompt_key: str) -> tuple[str, list[dict[str, str]], str, dict]:
    """Validate one row; raise BadRow("field: problem") on the first defect."""
    source = row.get("data_source")
    if not isinstance(source, str):
        raise BadRow(f"field 'data_source': expected a string, got {source!r:.80}")
    msgs = row.get(prompt_key)
    if not isinstance(msgs, (list, tuple)) or not msgs:
        raise BadRow(f"field '{prompt_key}': expected a non-empty list of chat messages, "
                     f"got {msgs!r:.80}")
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not m["role"] \
                or not isinstance(m.get("content"), str):
            raise BadRow(f"field '{prompt_key}[{j}]': expected {{'role': str, 'content': str}}, "
                         f"got {m!r:.80}")
    rm = row.get("reward_model")
    gt = rm.get("ground_truth") if isinstance(rm, dict) else None
    if isinstance(gt, (int, float)) and not isinstance(gt, bool):
        if not math.isfinite(gt):
            raise BadRow(f"field 'reward_model.ground_truth': expected a finite number or a "
                         f"non-empty string, got {gt!r}")
        gt = str(gt)
    if not isinstance(gt, str) or not gt.strip():
        raise BadRow(f"field 'reward_model.ground_truth': expected a non-empty string, "
                     f"got {gt!r:.80}")
    if not _is_answer(gt):
        raise BadRow(f"field 'reward_model.ground_truth': {gt.strip()!r:.80} is not an answer "
                     "(not a finite number)")
    extra = row.get("extra_info")
    if extra is None:
        extra = {}
    if not isinstance(extra, dict):
        raise BadRow(f"field 'extra_info': expected a mapping or null, got {extra!r:.80}")
    return source, [{"role": m["role"], "content": m["content"]} for m in msgs], gt, extra


# Ground truths that are not answers: what an export writes for a missing (NaN) or infinite
# number. ("None" is left alone: it can be a real answer.)
_NOT_ANSWERS = {"nan", "+nan", "-nan", "inf", "+inf", "-inf", "infinity", "+infinity",
                "-infinity"}


def _is_answer(gt: str) -> bool:
    return gt.strip().lower() not in _NOT_ANSWERS


def _read_rows(path: str, prompt_key: str) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    if os.path.isdir(path):
        raise IsADirectoryError(f"dataset file {path} is a directory, not a parquet file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"dataset file not found: {path}")
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a non-parquet file
        raise ValueError(f"{path}: cannot read as parquet: {' '.join(str(e).split())}") \
            from None
    required = ["data_source", prompt_key, "reward_model"]
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; found {table.column_names} "
                         f"(expected verl's schema: data_source, {prompt_key}, reward_model, "
                         f"extra_info)")
    try:
        return table.to_pylist()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: a string column holds bytes that are not UTF-8 "
                         f"({e.reason} at byte {e.start}); re-export the file as UTF-8") from None


class PromptDataset:
    """All prompts of `files`, validated and tokenized.

    `tokenizer` is a Hugging Face tokenizer with a chat template. Prompts longer than
    `max_prompt_length` tokens keep their last tokens (`truncate_left`, as verl's
    `truncation='left'`) or are dropped (`drop`); both are counted in `stats`.
    """

    def __init__(self, files: Sequence[str], tokenizer, *, max_prompt_length: int,
                 prompt_key: str = "prompt",
                 prompt_overflow: Literal["truncate_left", "drop"] = "truncate_left",
                 bad_rows: Literal["error", "skip"] = "error"):
        if not files:
            raise ValueError("no dataset files given")
        self.stats = DatasetStats()
        rows = []
        for path in files:
            for i, row in enumerate(_read_rows(path, prompt_key)):
                self.stats.rows += 1
                try:
                    rows.append((f"{path}:{i}", *_check_row(row, prompt_key)))
                except BadRow as e:
                    if bad_rows == "error":
                        raise BadRow(f"{path}: row {i}: {e} (set data.bad_rows=skip to skip "
                                     f"malformed rows)") from None
                    self.stats.bad_rows_skipped += 1
        texts = tokenizer.apply_chat_template([r[2] for r in rows], tokenize=False,
                                              add_generation_prompt=True) if rows else []
        # The template already contains any special tokens; add none of our own.
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if rows else []
        kept, dropped, truncated = fit_prompts(ids, max_prompt_length, prompt_overflow)
        self.stats.prompts_dropped += len(dropped)
        self.stats.prompts_truncated += truncated
        self.records: list[PromptRecord] = []
        for i, toks in kept:
            src, source, msgs, gt, extra = rows[i]
            self.records.append(PromptRecord(source, msgs, gt, extra, toks, src))
        if not self.records:
            raise ValueError(f"no usable prompts in {list(files)}: {self.stats}")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> PromptRecord:
        return self.records[i]


@dataclass
class PromptSampler:
    """Endless, deterministic stream of dataset indices in epochs.

    Epoch e visits every index once, in the order `permutation(seed, e)` (identity when not
    shuffling). The whole state is (epoch, position), so `state_dict()` saved with a checkpoint
    and `load_state_dict()` on resume give exactly the batches an uninterrupted run would get.
    A batch that reaches the end of an epoch continues into the next one.
    """

    num_items: int
    seed: int = 0
    shuffle: bool = True
    epoch: int = 0
    position: int = 0
    _order: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.num_items <= 0:
            raise ValueError(f"cannot sample from {self.num_items} items")

    def _epoch_order(self) -> np.ndarray:
        if self._order is None:
            if self.shuffle:
                self._order = np.random.default_rng([self.seed, self.epoch]).permutation(
                    self.num_items)
            else:
                self._order = np.arange(self.num_items)
        return self._order

    def next_indices(self, count: int) -> list[int]:
        out: list[int] = []
        while len(out) < count:
            order = self._epoch_order()
            take = min(count - len(out), self.num_items - self.position)
            out.extend(int(i) for i in order[self.position:self.position + take])
            self.position += take
            if self.position == self.num_items:
                self.epoch, self.position, self._order = self.epoch + 1, 0, None
        return out

    def state_dict(self) -> dict[str, int | bool]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "shuffle": self.shuffle, "num_items": self.num_items}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "shuffle", "num_items"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state does not match this dataset: saved {key}={state[key]!r}, "
                    f"now {getattr(self, key)!r} (did data.train_files, data.seed or "
                    f"data.shuffle change since the checkpoint?)")
        self.epoch, self.position, self._order = int(state["epoch"]), int(state["position"]), None
