"""Start or join the Ray cluster that hosts what is not SPMD (rollout engines, reward actors).

`rollout.ray_address` empty: a local Ray is started here and stopped by `release` (or at exit);
otherwise ("auto", host:port) an existing cluster is joined and left running. The torchrun rank
that calls this passes its environment on to the Ray workers a local cluster starts; the actors
remove the torch.distributed variables themselves (see `clean_worker_env`).
"""
from __future__ import annotations

import atexit
import logging
import os

_started_here = False
_users = 0

# Variables by which torchrun and torch.distributed tell a process it is a rank: an engine actor
# that inherited them would believe it is one (vLLM reads WORLD_SIZE, RANK, LOCAL_RANK).
TORCHRUN_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR",
                "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS",
                "TORCHELASTIC_RUN_ID", "TORCHELASTIC_USE_AGENT_STORE", "TORCH_NCCL_ASYNC_ERROR_HANDLING",
                "TORCHELASTIC_ERROR_FILE", "MEGATRON_RLVR_STRICT_DEVICE")


def clean_worker_env() -> None:
    """In a Ray actor: forget that the process which started Ray was a torchrun rank."""
    for name in TORCHRUN_ENV:
        os.environ.pop(name, None)


def acquire(address: str = "", num_cpus: float | None = None) -> None:
    """Make sure this process is connected to Ray: join `address`, or start a local cluster with
    `num_cpus` logical CPUs (at least the machine's)."""
    global _started_here, _users
    import ray

    _users += 1
    if ray.is_initialized():
        return
    quiet = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    if address:
        ray.init(address=address, **quiet)
        return
    cpus = max(float(os.cpu_count() or 1), num_cpus or 0.0)
    # address="local": a RAY_ADDRESS left in the environment must not redirect the start.
    ray.init(address="local", num_cpus=int(-(-cpus // 1)), **quiet)
    _started_here = True
    atexit.register(_shutdown)


def release() -> None:
    """One user is done; the last one stops a cluster started here."""
    global _users
    _users = max(0, _users - 1)
    if _users == 0:
        _shutdown()


def _shutdown() -> None:
    global _started_here
    if _started_here:
        import ray

        _started_here = False
        ray.shutdown()
