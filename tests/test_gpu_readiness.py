"""GPU readiness (issue 16) as far as a CPU can show it.

- The strict device guard (platform/strict_device.py) catches the bug classes that only a GPU
  would otherwise reveal, in the real model and loss path (tests/dist/strict_guard.py); every
  torchrun test of the suite runs in that mode (tests/torchrun.py).
- Each colocated vLLM engine under torchrun sits on its own rank's GPU.
- Sequence parallelism reaches the model, and padded lengths suit it.
"""
import os

import pytest
import torch

from megatron_rlvr.models.pipeline import sequence_length_multiple
from megatron_rlvr.models.tiny import save_tiny_model
from megatron_rlvr.rollout.vllm_engine import VLLMEngineConfig, engine_kwargs
from torchrun import ROOT, torchrun


@pytest.mark.slow
def test_strict_guard_catches_host_tensors(tmp_path):
    model = save_tiny_model(str(tmp_path / "model"), "qwen3", tie=True, seed=3)
    out = torchrun(ROOT / "tests/dist/strict_guard.py", 2, model,
                   env={"MEGATRON_RLVR_STRICT_DEVICE": "1"})
    assert out.count("strict guard OK") == 2


def test_engine_per_local_rank_on_gpus():
    """On GPUs every colocated engine uses vLLM's external launcher (device = LOCAL_RANK);
    vLLM's single-process executor takes the device index from its device config, which is plain
    "cuda", so every rank's engine would land on cuda:0."""
    cfg = VLLMEngineConfig(model_path="m")
    for world, tp in ((8, 1), (8, 2), (1, 1)):
        kw = engine_kwargs(VLLMEngineConfig(model_path="m", tensor_parallel_size=tp),
                           world=world, on_cuda=True)
        if world > 1:
            assert kw["distributed_executor_backend"] == "external_launcher"
            assert kw["data_parallel_size"] == world // tp
        else:
            assert "distributed_executor_backend" not in kw
        assert kw["enable_sleep_mode"] is True
    assert "distributed_executor_backend" not in engine_kwargs(cfg, world=2, on_cuda=False)
    with pytest.raises(ValueError, match="does not divide"):
        engine_kwargs(VLLMEngineConfig(model_path="m", tensor_parallel_size=3), world=8,
                      on_cuda=True)

    # The reason, read from vLLM itself: what each executor takes as this worker's local rank.
    from types import SimpleNamespace

    from vllm.v1.executor.uniproc_executor import ExecutorWithExternalLauncher, UniProcExecutor

    saved = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK")}
    os.environ.update(RANK="5", LOCAL_RANK="5")
    try:
        stub = SimpleNamespace(vllm_config=SimpleNamespace(
            device_config=SimpleNamespace(device=torch.device("cuda"))))
        assert UniProcExecutor._distributed_args(stub)[2] == 0
        assert ExecutorWithExternalLauncher._distributed_args(stub)[2] == 5
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


@pytest.mark.parametrize("tp,cp,sp,expected", [
    (1, 1, False, 1), (4, 1, False, 1), (4, 1, True, 4), (2, 2, False, 4), (2, 2, True, 8),
    (8, 4, True, 64),
])
def test_sequence_length_multiple(tp, cp, sp, expected):
    m = sequence_length_multiple(tp=tp, cp=cp, sequence_parallel=sp)
    assert m == expected
    # What Megatron needs: s divisible by 2·cp (cp > 1), and with SP each rank's s/cp by tp.
    s = 3 * m
    assert cp == 1 or s % (2 * cp) == 0
    assert not sp or (s // cp) % tp == 0


COMPILE_UNDER_THE_CPU_LAYER = """
import torch
from megatron_rlvr import platform
platform.setup()

@torch.compile(dynamic=True)
def count_greater(x, y):  # the shape of vLLM's sampler helper that first hit this
    return (x > y).sum(-1)

print("counts", count_greater(torch.arange(12.).view(3, 4), torch.full((3, 1), 1.5)).tolist())
"""


@pytest.mark.slow
def test_torch_compile_works_under_the_cpu_layer():
    """vLLM compiles its sampler inside the trainer's process, under the CPU layer's mode: the
    mode must not call anything torch.compile cannot guard (a staticmethod through `self` broke
    every colocated generate)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", COMPILE_UNDER_THE_CPU_LAYER], cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "MEGATRON_RLVR_STRICT_DEVICE": "0",
                               "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "counts [2, 4, 4]" in proc.stdout
