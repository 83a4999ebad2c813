"""Reward scoring on Ray CPU actors (`reward.backend: ray`), beside the rollout engines.

Each actor wraps a `RewardPool`: its worker processes, per-item deadlines and memory limits stay
as they are. `score` splits the items over the actors in contiguous shares and concatenates the
results in order; the interface is `RewardPool`'s, so the trainer uses either. Needs a Ray this
process is connected to (the fleet's), or starts a local one (`megatron_rlvr.ray_cluster`).
"""
from __future__ import annotations

import os

from megatron_rlvr import ray_cluster

from .pool import RewardPool, RewardResult


_STARTUP_TIMEOUT_S = 600.0


class RewardActorError(RuntimeError):
    """A reward actor died or did not answer in time; the message names it."""


class _RewardActorImpl:
    def __init__(self, num_workers: int, timeout_s: float, kwargs: dict):
        ray_cluster.clean_worker_env()
        self.pool = RewardPool(num_workers, timeout_s, **kwargs)

    def score(self, responses: list[str], truths: list[str]) -> list[RewardResult]:
        return self.pool.score(responses, truths)

    def pid(self) -> int:
        return os.getpid()

    def close(self) -> None:
        self.pool.close()


class RayRewardPool:
    def __init__(self, num_actors: int, timeout_s: float, *, num_workers_per_actor: int = 1,
                 ray_address: str = "", **pool_kwargs):
        import ray

        ray_cluster.acquire(ray_address, num_cpus=num_actors)  # one CPU an actor
        self._closed = False
        # The deadline of a whole call: every item could time out, one worker at a time.
        self.timeout_s = timeout_s
        actor = ray.remote(_RewardActorImpl).options(num_cpus=1, max_restarts=0)
        self.actors = [actor.remote(num_workers_per_actor, timeout_s, pool_kwargs)
                       for _ in range(num_actors)]
        # Started (workers up, math-verify imported) before any scoring deadline runs.
        self.pids = []
        for i, a in enumerate(self.actors):
            try:
                self.pids.append(ray.get(a.pid.remote(), timeout=_STARTUP_TIMEOUT_S))
            except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError) as e:
                self.close()
                raise RewardActorError(f"reward actor {i} of {num_actors} did not start within "
                                       f"{_STARTUP_TIMEOUT_S:.0f} s (each needs 1 CPU; the "
                                       f"cluster has {ray.cluster_resources().get('CPU', 0)}): "
                                       f"{str(e).splitlines()[0]}") from None

    def score(self, responses: list[str], ground_truths: list[str]) -> list[RewardResult]:
        import ray

        if len(responses) != len(ground_truths):
            raise ValueError(f"{len(responses)} responses but {len(ground_truths)} ground truths")
        n = len(self.actors)
        bounds = [len(responses) * i // n for i in range(n + 1)]
        refs = [(i, a.score.remote(responses[lo:hi], ground_truths[lo:hi]))
                for i, (a, lo, hi) in enumerate(zip(self.actors, bounds, bounds[1:])) if hi > lo]
        out: list[RewardResult] = []
        for i, ref in refs:
            items = bounds[i + 1] - bounds[i]
            try:
                out += ray.get(ref, timeout=60 + self.timeout_s * items)
            except ray.exceptions.GetTimeoutError:
                raise RewardActorError(f"reward actor {i} of {n} (pid {self.pids[i]}) did not "
                                       f"score {items} responses within "
                                       f"{60 + self.timeout_s * items:.0f} s") from None
            except ray.exceptions.RayActorError as e:
                raise RewardActorError(f"reward actor {i} of {n} (pid {self.pids[i]}) died: "
                                   f"{str(e).splitlines()[0]}") from None
        return out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        import ray

        if ray.is_initialized():
            for a in self.actors:
                try:
                    ray.kill(a, no_restart=True)
                except Exception:  # noqa: BLE001 - already gone
                    pass
        ray_cluster.release()

    def __enter__(self) -> "RayRewardPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
