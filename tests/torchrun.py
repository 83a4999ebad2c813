"""Run a script under `torchrun` with gloo on CPU and fail the test with its output if it fails.

Multi-process tests are written as plain scripts (tests/dist/*.py) that assert on every rank and
exit non-zero on failure; the pytest side only launches them. A timeout turns a hang into a failure.

Every run is in strict device mode (megatron_rlvr/platform/strict_device.py): "cuda" is a device
apart from the host, so a tensor that a GPU run would find on the wrong device fails here too.
Pass env={"MEGATRON_RLVR_STRICT_DEVICE": "0"} to turn it off.

Every process ends without the interpreter's teardown once its work is done (torchrun through
torchrun_launch.py, the ranks through megatron_rlvr/fast_exit.py): seconds of CPU per rank.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def torchrun(script: str | Path, nproc: int, *args: str, timeout: float = 600,
             env: dict | None = None) -> str:
    """Launch `script` on `nproc` local processes; return its combined output."""
    # torchrun itself (torch.distributed.run's main), through torchrun_launch.py: no teardown
    cmd = [sys.executable, str(ROOT / "tests" / "torchrun_launch.py"), "--standalone",
           f"--nproc_per_node={nproc}", str(script), *map(str, args)]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
                "PYTHONUNBUFFERED": "1", "MEGATRON_RLVR_STRICT_DEVICE": "1", **(env or {})}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env,
                              cwd=ROOT)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        raise AssertionError(f"torchrun {script} timed out after {timeout}s\n{out[-8000:]}")
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise AssertionError(f"torchrun {script} exited {proc.returncode}\n{out[-12000:]}")
    return out
