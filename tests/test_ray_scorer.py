"""Rewards on Ray actors (`reward.backend: ray`, megatron_rlvr/rewards/ray_scorer.py): the same
results as the local RewardPool, in order, hostile answers timed out inside the actors; a dead
actor is named; the local Ray it started is gone after close."""
import os
import signal
import time

import pytest

from megatron_rlvr.rewards.pool import RewardPool
from megatron_rlvr.rewards.ray_scorer import RayRewardPool, RewardActorError
from test_ray_rollout import _ray_pids

pytestmark = pytest.mark.slow

RESPONSES = ["so \\boxed{95}", "\\boxed{94}", "no box here", "\\boxed{\\frac{1}{2}}",
             "\\boxed{10^{10^{10^{10}}}}", "\\boxed{0.5}", "\\boxed{x+1}", "\\boxed{-3}"]
TRUTHS = ["95", "95", "95", "0.5", "7", "1/2", "1+x", "-3"]


def test_same_scores_as_the_local_pool_and_nothing_left():
    before = _ray_pids()
    with RewardPool(1, 2.0) as local:
        expected = local.score(RESPONSES, TRUTHS)
    assert [r.score for r in expected] == [1, 0, 0, 1, 0, 1, 1, 1]
    assert [r.timed_out for r in expected] == [False] * 4 + [True] + [False] * 3
    pool = RayRewardPool(3, 2.0)  # 8 items over 3 actors: shares of 2, 3, 3
    try:
        got = pool.score(RESPONSES, TRUTHS)
        assert got == expected
        assert pool.score([], []) == []
        import ray

        os.kill(ray.get(pool.actors[1].pid.remote()), signal.SIGKILL)
        time.sleep(1)
        with pytest.raises(RewardActorError, match=r"reward actor 1 of 3 \(pid \d+\) died"):
            pool.score(RESPONSES, TRUTHS)
    finally:
        pool.close()
    time.sleep(1)
    assert _ray_pids() <= before, "Ray processes left behind"
