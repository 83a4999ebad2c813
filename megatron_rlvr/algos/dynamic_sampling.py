"""DAPO dynamic sampling: keep only prompts whose responses disagree, generate until enough.

A group whose responses all score the same has zero GRPO advantage everywhere: it costs a
forward/backward and contributes no gradient. DAPO drops such groups and generates more rounds
of `gen_batch_size` prompts until `train_batch_size` groups survive. Filter on accuracy (0/1
correctness), as the paper does (verl's `filter_groups.metric=acc`), not on the shaped reward.

    acc = GroupAccumulator(train_batch_size=512, max_rounds=10)
    while not acc.full:
        groups, accuracies = generate_round(...)      # accuracies: [num_groups][n]
        acc.add(groups, accuracies)                   # raises after max_rounds without enough
    batch = acc.take()                                # exactly train_batch_size groups
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, Sequence, TypeVar

Group = TypeVar("Group")


class DynamicSamplingError(RuntimeError):
    """Too few informative groups after the allowed number of generation rounds."""


@dataclass
class SamplingStats:
    rounds: int = 0
    generated: int = 0           # groups generated in all rounds
    kept: int = 0                # groups with differing scores (including any cut by `take`)
    dropped_all_correct: int = 0  # all scores equal and > 0
    dropped_all_wrong: int = 0    # all scores equal and <= 0


class GroupAccumulator(Generic[Group]):
    """Collects informative groups over generation rounds for one RL step.

    `groups` are opaque to this class (the trainer passes `generation.GroupSummary`s: scores and
    lengths without tokens, the same on every rank, so every rank keeps the same groups); only
    their scores decide. With `enabled=False` every group is kept (plain GRPO), through the same
    code.
    """

    def __init__(self, train_batch_size: int, max_rounds: int, enabled: bool = True):
        self.train_batch_size = train_batch_size
        self.max_rounds = max_rounds
        self.enabled = enabled
        self.stats = SamplingStats()
        self._kept: list[Group] = []

    @property
    def kept(self) -> tuple[Group, ...]:
        """The groups kept so far, in generation order (the trainer drops the tokens of the rest)."""
        return tuple(self._kept)

    @property
    def full(self) -> bool:
        return len(self._kept) >= self.train_batch_size

    def add(self, groups: Sequence[Group], scores: Sequence[Sequence[float]] | Any) -> None:
        """Add one round: `scores[i]` are the per-response scores of `groups[i]`."""
        if len(groups) != len(scores):
            raise ValueError(f"{len(groups)} groups but {len(scores)} score lists")
        s = self.stats
        s.rounds += 1
        s.generated += len(groups)
        for group, group_scores in zip(groups, scores):
            values = [float(v) for v in group_scores]
            if self.enabled and min(values) == max(values):
                if values[0] > 0:
                    s.dropped_all_correct += 1
                else:
                    s.dropped_all_wrong += 1
                continue
            s.kept += 1
            self._kept.append(group)
        if not self.full and s.rounds >= self.max_rounds:
            raise DynamicSamplingError(
                f"dynamic sampling: after {s.rounds} generation rounds only {s.kept} of "
                f"{s.generated} generated prompts had responses with differing accuracy "
                f"({s.dropped_all_correct} all correct, {s.dropped_all_wrong} all wrong); "
                f"{self.train_batch_size} are needed per step. Raise "
                f"algorithm.max_num_gen_batches or trainer.gen_batch_size, lower "
                f"trainer.train_batch_size, raise rollout.n, or use data whose difficulty "
                f"suits the model.")

    def take(self) -> list[Group]:
        """Exactly `train_batch_size` kept groups, in generation order (the rest are discarded)."""
        if not self.full:
            raise RuntimeError(f"only {len(self._kept)} of {self.train_batch_size} groups "
                               f"collected; keep adding rounds until `full`")
        return self._kept[:self.train_batch_size]
