"""One RL step's rollout (DAPO dynamic sampling over generation rounds), made in step with the
trainer or ahead of it.

`collect_step` is the loop both rollout modes share: draw `gen_batch_size` prompts, generate and
score a round, keep the groups whose responses disagree, repeat until `train_batch_size` groups
are kept. Colocated, every rank runs it in lockstep (each round is a collective). Disaggregated,
trainer rank 0 runs it alone against the Ray fleet, in a `RolloutProducer` thread, so that the
rollout of step k+1 can run while step k trains:

    producer = RolloutProducer(make_step, first_step=1, max_staleness=1, synced_version=0)
    producer.start()
    batch = producer.take(step)            # waits for step's rollout (or raises its error)
    ...train..., sync weights of version step to the engines...
    producer.weights_synced(step)          # lets the producer start step + 1 + max_staleness

Staleness: the policy version v is the number of RL steps trained into the weights. Step k trains
the policy of version k - 1, so a group generated with version v is k - 1 - v versions stale. The
producer starts step j only once version j - 1 - max_staleness is on the engines: 0 = synchronous,
1 = one-step-off. A step's rounds may straddle a weight update, so its groups may carry two versions.

Resume: the prompts of a rollout made ahead but not trained on are lost with the process. The
checkpoint therefore stores the prompt sampler's state from before the first untrained step's
draws (`resume_state`): a resumed run draws those prompts again, none lost, none repeated.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable

from megatron_rlvr.algos.dynamic_sampling import GroupAccumulator, SamplingStats
from megatron_rlvr.generation import Group, GroupSummary, Round
from megatron_rlvr.rollout.base import RolloutError, SamplingParams


class RolloutNotReady(RolloutError):
    """`take` waited its timeout and the step's rollout is still being made."""


@dataclass
class StepBatch:
    """What one RL step trains on: the chosen groups' summaries (train_batch_size, generation
    order), every generated summary (for the reward metrics), the sampling stats, and the chosen
    groups' payloads this rank holds."""
    chosen: list[GroupSummary]
    generated: list[GroupSummary]
    stats: SamplingStats
    local: dict[tuple[int, int], Group]
    sampler_state: dict = field(default_factory=dict)  # before this step's prompts were drawn


def collect_step(make_round: Callable[[list[int], SamplingParams, int], Round], sampler, *,
                 train_batch_size: int, gen_batch_size: int, max_rounds: int,
                 dynamic_sampling: bool, params_for_round: Callable[[int], SamplingParams]
                 ) -> StepBatch:
    """Generation rounds until `train_batch_size` groups are kept (DAPO dynamic sampling).
    `make_round(indices, params, round_index=i)` generates and scores one round; only the tokens
    of groups that may still train are kept."""
    acc = GroupAccumulator(train_batch_size, max_rounds, enabled=dynamic_sampling)
    generated, local = [], {}
    while not acc.full:
        indices = sampler.next_indices(gen_batch_size)
        rnd = make_round(indices, params_for_round(acc.stats.rounds),
                         round_index=acc.stats.rounds)
        generated += rnd.summaries
        acc.add(rnd.summaries, [g.accuracy for g in rnd.summaries])
        kept = {g.key for g in acc.kept}
        local.update((k, g) for k, g in rnd.local.items() if k in kept)
    chosen = acc.take()
    keys = {g.key for g in chosen}
    return StepBatch(chosen, generated, acc.stats, {k: g for k, g in local.items() if k in keys})


class RolloutProducer:
    """Makes step batches in a background thread, at most `max_staleness` versions ahead of the
    weights on the engines. `make_step(step)` does one step's rollout (it draws from `sampler`);
    errors it raises are re-raised by `take`."""

    def __init__(self, make_step: Callable[[int], StepBatch], sampler, *, first_step: int,
                 max_staleness: int, synced_version: int):
        self._make_step = make_step
        self._sampler = sampler
        self._next = first_step            # the next step to produce
        self._staleness = max_staleness
        self._synced = synced_version      # the version the engines hold
        self._ready: dict[int, StepBatch] = {}
        self._before: dict[int, dict] = {}  # sampler state before each started step
        self._error: BaseException | None = None
        self._stopping = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="rollout-producer", daemon=True)

    def start(self) -> "RolloutProducer":
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: self._stopping
                                        or self._next - 1 - self._synced <= self._staleness)
                    if self._stopping:
                        return
                    step = self._next
                    self._before[step] = self._sampler.state_dict()
                batch = self._make_step(step)
                batch.sampler_state = self._before[step]
                with self._cond:
                    self._ready[step] = batch
                    self._next = step + 1
                    self._cond.notify_all()
        except BaseException as e:  # noqa: BLE001 - handed to the trainer's thread by take()
            with self._cond:
                self._error = e
                self._cond.notify_all()

    def take(self, step: int, timeout_s: float) -> StepBatch:
        """Step `step`'s batch, waiting up to `timeout_s`; the producer's error if it failed."""
        with self._cond:
            done = self._cond.wait_for(
                lambda: step in self._ready or self._error is not None, timeout=timeout_s)
            if step in self._ready:
                self._before = {s: v for s, v in self._before.items() if s > step}
                return self._ready.pop(step)
            if self._error is not None:
                raise self._error
            assert not done
            raise RolloutNotReady(f"the rollout of step {step} did not finish within "
                                  f"{timeout_s:.0f} s")

    def weights_synced(self, version: int) -> None:
        """The engines now hold policy version `version`: later steps may start."""
        with self._cond:
            self._synced = version
            self._cond.notify_all()

    def resume_state(self, next_step: int) -> dict:
        """The sampler state a resumed run must start from to redraw step `next_step`'s prompts:
        from before that step's draws if it has started, else the sampler's current state."""
        with self._cond:
            if next_step in self._before:
                return dict(self._before[next_step])
            return self._sampler.state_dict()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop producing; the thread ends after the call it is in (the fleet's shutdown ends
        that one). It is a daemon: it never keeps the process alive."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)
