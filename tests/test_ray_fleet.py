"""The rollout fleet alone (megatron_rlvr/rollout/fleet.py), without the trainer: a hung engine.

test_ray_rollout.py kills an engine actor mid-run (a death Ray reports at once). A hang is the
other fault: the actor is alive but never answers (here: SIGSTOP, as a wedged CUDA kernel or a
stuck collective would leave it). Ray reports nothing; only the fleet's per-call deadline can end
the wait. It must raise a `RolloutError` naming the engine (index, pid) within that deadline, and
shutting the fleet down must still leave no Ray process behind, the stopped actor included.
"""
import os
import re
import signal
import time

import pytest

from megatron_rlvr.models.tiny import save_tiny_model
from megatron_rlvr.rollout.base import RolloutError, SamplingParams
from megatron_rlvr.rollout.fleet import FleetConfig, RolloutFleet
from megatron_rlvr.rollout.vllm_engine import VLLMEngineConfig
from test_ray_rollout import _ray_pids

pytestmark = pytest.mark.slow

DEADLINE_S = 10.0


def test_a_hung_engine_is_named_within_the_deadline(tmp_path):
    model = save_tiny_model(str(tmp_path / "model"), "qwen3", tie=True, seed=3)
    before = _ray_pids()
    # Start-up (vLLM's engine, the weight stream) under a generous deadline; calls after under
    # a short one, as trainer.collective_timeout_s would set it.
    fleet = RolloutFleet(FleetConfig(engine=VLLMEngineConfig(
        model_path=model, max_model_len=64, enforce_eager=True, dtype="float32"),
        engines=1, timeout_s=600))
    stopped = None
    try:
        params = [SamplingParams(n=2, max_tokens=4, seed=1)]
        (out, version), = fleet.generate([[[1, 2, 3]]], params)
        assert version == 0 and len(out.outputs[0].samples) == 2
        stopped = int(re.search(r"pid (\d+)", fleet._name(0))[1])
        fleet.cfg.timeout_s = DEADLINE_S
        os.kill(stopped, signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(RolloutError) as err:
            fleet.generate([[[1, 2, 3]]], params)
        waited = time.monotonic() - t0
        assert DEADLINE_S - 1 < waited < DEADLINE_S + 20, waited
        msg = str(err.value)
        assert msg.startswith("rollout engine 0 of 1") and f"pid {stopped}" in msg, msg
        assert f"did not answer within {DEADLINE_S:.0f} s while generating" in msg, msg
    finally:
        fleet.shutdown()  # kills the actors, stops the local Ray it started
    deadline = time.monotonic() + 30
    while _ray_pids() - before and time.monotonic() < deadline:
        time.sleep(0.5)
    left = _ray_pids() - before
    if left and stopped in left:
        os.kill(stopped, signal.SIGKILL)  # do not leave a stopped process to the next test
    assert not left, f"Ray processes left behind: {sorted(left)} (the stopped engine: {stopped})"
