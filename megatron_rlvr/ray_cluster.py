"""Start or join the Ray cluster that hosts what is not SPMD (rollout engines, reward actors).

`rollout.ray_address` empty: a local Ray is started here and stopped by `release` (or at exit);
otherwise ("auto", host:port) an existing cluster is joined and left running. The torchrun rank
that calls this passes its environment on to the Ray workers a local cluster starts; the actors
remove the torch.distributed variables themselves (see `clean_worker_env`).

Joining by address: Ray 2.60's `ray start` turns token authentication on when its node holds a
token (~/.ray/auth_token: any local `ray.init()` writes one), and a driver that does not present
it is refused with nothing but "Failed to connect". When RAY_AUTH_MODE is not set and a token is
at hand (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token), the join presents it; a cluster
without authentication accepts such a driver too. A join that fails names the address and the
token as the likely cause (`ClusterError`), instead of Ray's traceback.
"""
from __future__ import annotations

import atexit
import logging
import os
import socket
import time

_started_here = False
_users = 0


class ClusterError(RuntimeError):
    """The Ray cluster could not be joined; the message says where and what to check."""

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
        _join(address, quiet)
        return
    cpus = max(float(os.cpu_count() or 1), num_cpus or 0.0)
    # address="local": a RAY_ADDRESS left in the environment must not redirect the start.
    ray.init(address="local", num_cpus=int(-(-cpus // 1)), **quiet)
    _started_here = True
    atexit.register(_shutdown)


def _auth_token_source() -> str | None:
    """Where a Ray auth token is for this process, if anywhere (Ray's own lookup order)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    for path in (os.environ.get("RAY_AUTH_TOKEN_PATH"),
                 os.path.join(os.path.expanduser("~"), ".ray", "auth_token")):
        if path and os.path.isfile(path):
            return path
    return None


def _enable_token_auth() -> None:
    """RAY_AUTH_MODE=token for this process. Ray reads its config once, at import: setting the
    variable afterwards is not enough, so this uses Ray's own switch (what `ray start` calls when
    it finds a token), which also reloads the config."""
    try:
        from ray._private.authentication.authentication_token_setup import _enable_token_auth
    except ImportError:  # another Ray layout: the variable still works before Ray's config loads
        os.environ["RAY_AUTH_MODE"] = "token"
        return
    _enable_token_auth()


def _check_reachable(address: str, wait_s: float = 30.0) -> None:
    """A host:port that nothing answers on fails here, in seconds: Ray's own join retries the
    GCS for minutes (the stall watchdog would be the first to speak). "auto" is Ray's to resolve."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return
    deadline = time.monotonic() + wait_s  # the head may still be starting
    while True:
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
            return
        except OSError as e:
            if time.monotonic() >= deadline:
                global _users
                _users -= 1
                raise ClusterError(
                    f"nothing answers at rollout.ray_address={address!r} ({e.strerror or e}) "
                    f"after {wait_s:.0f} s: is the Ray head started there (`ray start --head "
                    f"--port={port}`), and is the address the head's?") from None
            time.sleep(1.0)


def _join(address: str, quiet: dict) -> None:
    import ray

    _check_reachable(address)
    token = _auth_token_source()
    if token and not os.environ.get("RAY_AUTH_MODE"):
        _enable_token_auth()
    try:
        ray.init(address=address, **quiet)
    except (ConnectionError, RuntimeError) as e:
        global _users
        _users -= 1
        mode = os.environ.get("RAY_AUTH_MODE") or "not set"
        raise ClusterError(
            f"could not join the Ray cluster at rollout.ray_address={address!r}: "
            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}. Check that `ray start` "
            f"runs on this node (a driver joining by address needs a raylet on its own machine) "
            f"and that the address is the head's; a cluster that `ray start` made requires its "
            f"auth token (RAY_AUTH_MODE={mode}, token: "
            f"{token or 'none found in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token'}; "
            f"copy the head's ~/.ray/auth_token to every node)") from None


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
