"""The prompt-length policy, shared by the data module (filtering a dataset before training) and
the rollout engines (a prompt that would leave no room to generate). It lives here, below both,
so that `data/` never imports `rollout/`."""
from __future__ import annotations

from typing import Literal, Sequence

PromptOverflow = Literal["truncate_left", "drop"]


def fit_prompts(prompts: Sequence[Sequence[int]], limit: int, policy: PromptOverflow
                ) -> tuple[list[tuple[int, list[int]]], list[int], int]:
    """Apply the prompt-length policy to prompts longer than `limit` tokens.

    `truncate_left` keeps the last `limit` tokens: the end of a chat prompt (the question and the
    assistant header the response continues from) matters more than its start. `drop` leaves the
    prompt out. Returns ([(index, prompt)] kept, [index] dropped, number truncated).
    """
    if policy not in ("truncate_left", "drop"):
        raise ValueError(f"prompt overflow policy must be 'truncate_left' or 'drop', got {policy!r}")
    if limit < 1:
        raise ValueError(f"the prompt length limit must be >= 1 token, got {limit}")
    kept, dropped, truncated = [], [], 0
    for i, p in enumerate(prompts):
        p = list(p)
        if len(p) <= limit:
            kept.append((i, p))
        elif policy == "drop":
            dropped.append(i)
        else:
            kept.append((i, p[-limit:]))
            truncated += 1
    return kept, dropped, truncated
