"""The rollout producer's schedule (megatron_rlvr/step_rollout.py): how far ahead of the weights it
runs, what a checkpoint must store so that a resume loses and repeats no prompt, and how its
errors reach the trainer. `make_step` here is a plain function drawing from the real
PromptSampler and recording when it ran; the engines are not involved (tests/test_ray_rollout.py
runs the producer against a Ray fleet)."""
import threading
import time

import pytest

from megatron_rlvr.data.dataset import PromptSampler
from megatron_rlvr.rollout.base import RolloutError
from megatron_rlvr.step_rollout import RolloutNotReady, RolloutProducer, StepBatch


class Recorder:
    """make_step: draws 3 prompts per step, records (step, version on the engines when it ran)."""

    def __init__(self, sampler, fail_at=None):
        self.sampler, self.fail_at = sampler, fail_at
        self.runs: list[tuple[int, int]] = []
        self.version = 0
        self.drawn: dict[int, list[int]] = {}

    def __call__(self, step):
        if step == self.fail_at:
            raise RolloutError(f"engine 0 died at step {step}")
        self.drawn[step] = self.sampler.next_indices(3)
        self.runs.append((step, self.version))
        return StepBatch([], [], None, {})


def _wait_for(predicate, timeout=5.0):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.parametrize("staleness", [0, 1, 2])
def test_runs_at_most_max_staleness_versions_ahead(staleness):
    sampler = PromptSampler(100, seed=0)
    rec = Recorder(sampler)
    producer = RolloutProducer(rec, sampler, first_step=1, max_staleness=staleness,
                               synced_version=0).start()
    try:
        for step in range(1, 6):
            producer.take(step, timeout_s=5)
            # Training step `step` happens here; the producer may run up to step+staleness.
            _wait_for(lambda: len(rec.runs) >= min(step + staleness, 5 + staleness))
            time.sleep(0.05)  # and not further
            assert len(rec.runs) == step + staleness, (step, rec.runs)
            rec.version = step
            producer.weights_synced(step)
        # Step j ran with the weights of version j-1-staleness (or 0 at the start): its batch
        # is exactly `staleness` versions stale once the pipeline is full.
        for j, version in rec.runs:
            assert version == max(0, j - 1 - staleness), rec.runs
    finally:
        producer.stop()


def test_resume_state_redraws_the_untrained_prompts():
    """A checkpoint after step 2, with steps 3 and 4 already drawn ahead, stores the sampler from
    before step 3: the resumed run draws exactly steps 3, 4, ... of the uninterrupted run."""
    reference = PromptSampler(50, seed=3)
    expected = [reference.next_indices(3) for _ in range(6)]

    sampler = PromptSampler(50, seed=3)
    rec = Recorder(sampler)
    producer = RolloutProducer(rec, sampler, first_step=1, max_staleness=2,
                               synced_version=0).start()
    for step in (1, 2):
        producer.take(step, timeout_s=5)
        producer.weights_synced(step)
    _wait_for(lambda: 4 in rec.drawn)
    state = producer.resume_state(3)
    producer.stop()
    assert [rec.drawn[s] for s in (1, 2)] == expected[:2]

    resumed = PromptSampler(50, seed=3)
    resumed.load_state_dict(state)
    assert [resumed.next_indices(3) for _ in range(4)] == expected[2:]


def test_resume_state_before_the_next_step_started():
    sampler = PromptSampler(20, seed=1)
    rec = Recorder(sampler)
    producer = RolloutProducer(rec, sampler, first_step=1, max_staleness=0,
                               synced_version=0).start()
    producer.take(1, timeout_s=5)  # step 2 cannot start before version 1 is synced
    time.sleep(0.05)
    assert producer.resume_state(2) == sampler.state_dict()
    producer.stop()


def test_error_reaches_take_and_a_stuck_rollout_times_out():
    sampler = PromptSampler(20, seed=1)
    producer = RolloutProducer(Recorder(sampler, fail_at=2), sampler, first_step=1,
                               max_staleness=1, synced_version=0).start()
    producer.take(1, timeout_s=5)
    with pytest.raises(RolloutError, match="engine 0 died at step 2"):
        producer.take(2, timeout_s=5)
    producer.stop()

    gate = threading.Event()
    stuck = RolloutProducer(lambda step: gate.wait() and StepBatch([], [], None, {}), sampler,
                            first_step=1, max_staleness=0, synced_version=0).start()
    start = time.time()
    with pytest.raises(RolloutNotReady, match="rollout of step 1 did not finish within 0 s"):
        stuck.take(1, timeout_s=0.3)
    assert time.time() - start < 2
    gate.set()
    stuck.stop()
