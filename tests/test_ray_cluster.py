"""Joining a Ray cluster by address (`rollout.ray_address`, the multi-node path of
docs/disaggregated.md), against a real `ray start --head` on this machine.

Ray 2.60's `ray start` turns token authentication on when the node has a token (~/.ray/auth_token,
which any local `ray.init()` writes, or `ray get-auth-token --generate`); a driver joining by
address does not present it unless RAY_AUTH_MODE=token, and gets only "Failed to connect".
`ray_cluster.acquire` presents the token it finds without the user setting RAY_AUTH_MODE; without
a token the join fails in a `ClusterError` that names the address and the token. An address nothing answers on is
refused within seconds, not after Ray's minutes of retries. Each driver runs in its own
process (a driver stays connected until it exits); HOME is a temporary folder, so the test never
reads or writes the user's own ~/.ray.
"""
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from test_ray_rollout import _ray_pids
from torchrun import ROOT

pytestmark = pytest.mark.slow

DRIVER = """
import os, sys
from megatron_rlvr import ray_cluster
try:
    ray_cluster.acquire(sys.argv[1])
except ray_cluster.ClusterError as e:
    print("ClusterError:", e)
    sys.exit(3)
import ray
print("auth", os.environ.get("RAY_AUTH_MODE"), "cpus", ray.cluster_resources().get("CPU"))
print("task", ray.get(ray.remote(lambda: 6 * 7).options(num_cpus=1).remote()))
ray_cluster.release()  # joined, not started here: the cluster stays up
"""


def _driver(address, home, wait=True):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, address], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**clean, "HOME": str(home), "PYTHONPATH": str(ROOT)})
    return _finish(proc) if wait else proc


def _finish(proc):
    out, _ = proc.communicate(timeout=240)
    return proc.returncode, out


def test_join_by_address_presents_the_token_or_names_it():
    before = _ray_pids()
    work = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: Ray's socket paths must fit
    home, empty = os.path.join(work, "home"), os.path.join(work, "empty")
    os.makedirs(home), os.makedirs(empty)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]  # nothing listens here once this socket is closed
    address = f"127.0.0.1:{port}"
    # A typo'd or dead address: refused after the reachability wait (30 s), not after Ray's
    # minutes of retries. Runs beside the rest.
    nobody = _driver(f"127.0.0.1:{closed}", home, wait=False)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    subprocess.run([ray_bin, "get-auth-token", "--generate"], env={**env, "HOME": home},
                   check=True, capture_output=True, timeout=60)
    assert os.path.isfile(os.path.join(home, ".ray", "auth_token"))
    head = subprocess.Popen([ray_bin, "start",
                             "--head", "--block", f"--port={port}", "--num-cpus=1",
                             "--node-ip-address=127.0.0.1", "--include-dashboard=false",
                             f"--temp-dir={work}/r", "--disable-usage-stats"],
                            env={**env, "HOME": home}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        rc, out = _driver(address, home)
        assert rc == 0 and "auth token cpus 1.0" in out and "task 42" in out, out[-3000:]
        rc, msg = _driver(address, empty)
        assert rc == 3, msg[-3000:]
        assert f"rollout.ray_address='{address}'" in msg and "auth token" in msg, msg
        assert "none found" in msg, msg
        assert head.poll() is None, "a driver's release stopped the cluster it only joined"
        rc, msg = _finish(nobody)
        assert rc == 3 and f"nothing answers at rollout.ray_address='127.0.0.1:{closed}'" in msg, \
            msg[-3000:]
    finally:
        head.terminate()  # --block: ray start stops what it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, 9)
        deadline = time.time() + 30
        while _ray_pids() - before and time.time() < deadline:
            time.sleep(0.5)
        shutil.rmtree(work, ignore_errors=True)
    assert not _ray_pids() - before, "Ray processes left behind"
