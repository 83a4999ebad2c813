"""A dead or hung rank ends the whole torchrun job within the timeout, naming the rank.

tests/dist/fault_stall.py runs 3 gloo ranks that loop checked all-reduces; at iteration 20 rank 1
SIGKILLs itself or stops taking part. torchrun must exit non-zero, every worker process must be
gone within the collective timeout (plus start-up-independent slack), and the output must name
rank 1: torchrun's root cause for the kill, the watchdog's report for the hang.
"""
import os
import re
import subprocess
import sys
import time

import pytest

from megatron_rlvr import watchdog
from torchrun import ROOT

SCRIPT = ROOT / "tests" / "dist" / "fault_stall.py"
TIMEOUT_S = 4.0
# The watchdog checks every heartbeat interval, so it fires between TIMEOUT_S and TIMEOUT_S plus
# one interval after the stall; torchrun then needs a moment to stop the rest.
SLACK_S = watchdog.heartbeat_interval(TIMEOUT_S) + 10


def _run(mode: str) -> tuple[int, str, float]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3",
           str(SCRIPT), mode, "--culprit=1", f"--timeout-s={TIMEOUT_S}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1",
           "MEGATRON_RLVR_STRICT_DEVICE": "1"}  # as tests/torchrun.py: "cuda" apart from the host
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    end = time.time()
    return proc.returncode, proc.stdout + proc.stderr, end


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _check_common(rc: int, out: str, end: float) -> None:
    assert rc != 0, out[-4000:]
    pids = [int(p) for p in re.findall(r"PID rank=\d pid=(\d+)\n", out)]
    assert len(pids) == 3, out[-4000:]
    assert not [p for p in pids if _alive(p)], "a worker outlived torchrun"
    stall = float(re.search(r"STALL at=([\d.]+) mode=\w+ rank=1\n", out).group(1))
    assert end - stall < TIMEOUT_S + SLACK_S, f"took {end - stall:.1f} s after the stall"


def _root_cause(out: str) -> str:
    return out.split("Root Cause (first observed failure):", 1)[1]


@pytest.mark.slow
def test_killed_rank_stops_every_rank_and_is_named():
    rc, out, end = _run("kill")
    _check_common(rc, out, end)
    root = _root_cause(out)
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)", root), root
    assert "SIGKILL" in root, root


@pytest.mark.slow
def test_hung_rank_stops_every_rank_and_is_named():
    rc, out, end = _run("hang")
    _check_common(rc, out, end)
    suspects = re.findall(r"^\[watchdog\] suspect rank (\d+): (.*)$", out, re.M)
    assert suspects == [("1", suspects[0][1])], out[-4000:]
    assert suspects[0][1].startswith("behind: issued 20 collectives, others 21"), suspects
    assert "fault_stall.py" in suspects[0][1]       # where the hung rank's main thread is
    assert len(re.findall(r"^\[watchdog\] suspect", out, re.M)) == 1   # one report per run
    assert f"exitcode  : {watchdog.EXIT_CODE}" in out


@pytest.mark.slow
def test_watchdog_quiet_after_a_clean_finish():
    """destroy_distributed stops the watchdog: lingering after it is not reported as a stall."""
    rc, out, _ = _run("finish")
    assert rc == 0, out[-4000:]
    assert sorted(re.findall(r"FINISHED rank=(\d)\n", out)) == ["0", "1", "2"]
    assert "[watchdog]" not in out


PEER = """
import os, sys, torch, torch.distributed as dist
from megatron_rlvr import watchdog
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{sys.argv[1]}",
                        rank=int(sys.argv[2]), world_size=2)
if int(sys.argv[2]) == 0:
    os._exit(0)  # ends without a word, as a rank does after printing its own error
try:
    dist.broadcast(torch.zeros(1), src=0)
except RuntimeError as e:
    print("peer_gone", watchdog.peer_gone(e), type(e).__name__)
"""


@pytest.mark.slow
def test_a_collective_whose_peer_ended_is_recognised():
    """What gloo raises on a rank whose peer process ended is what `watchdog.peer_gone` matches:
    the CLI then prints one line pointing at the peer's error instead of a traceback (rank 0's
    one-line error, then every other rank's traceback, was the output of a refused Ray join)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", PEER, str(port), str(r)], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in (0, 1)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert "peer_gone True" in outs[1], outs[1][-3000:]
    assert not watchdog.peer_gone(RuntimeError("CUDA out of memory"))
    assert not watchdog.peer_gone(ValueError("Connection closed by peer"))
