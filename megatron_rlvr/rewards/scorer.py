"""The reward scorer a `reward:` config section asks for: one place, so the trainer and the eval
CLI cannot drift apart on which grader, format or limits they pass."""
from __future__ import annotations

from .pool import RewardPool


def build_scorer(c, *, backend: str | None = None, ray_address: str = ""):
    """`c` is a `RewardConfig`. `backend` overrides `c.backend` ("local" | "ray"): the eval CLI
    scores in-process whatever the training config says. Both scorers share `score`/`close`."""
    kwargs = dict(answer_format=c.format, grader=c.grader, memory_limit_mb=c.memory_limit_mb)
    if (backend or c.backend) == "ray":
        from .ray_scorer import RayRewardPool

        return RayRewardPool(c.ray_actors, c.timeout_s, num_workers_per_actor=c.num_workers,
                             ray_address=ray_address, **kwargs)
    return RewardPool(c.num_workers, c.timeout_s, **kwargs)
