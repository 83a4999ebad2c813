"""A finished run exits 0: nothing left running at exit (issue 11).

The SIGABRT seen once after the last step of a torchrun run ("terminate called without an active
exception") is what happens when a daemon thread is inside a torch C++ call that released the GIL
while the interpreter exits: Python ends the thread by unwinding through C++ frames, which aborts
(a daemon thread looping on `TCPStore.set` reproduces it on every exit). The stall watchdog's
heartbeat thread (`store.set`) was such a thread: `watchdog.stop()` now waits for it to end, and
the trainer stops it first when it closes.
"""
import os
import subprocess
import sys
import threading
import time

import pytest

from megatron_rlvr import watchdog
from megatron_rlvr.data.synthetic import write_synthetic_dataset
from megatron_rlvr.models.tiny import save_tiny_model
from torchrun import ROOT


def test_watchdog_stop_waits_for_its_thread(monkeypatch):
    """stop() returns only once the heartbeat thread has ended, even mid-beat."""
    dog = object.__new__(watchdog.Watchdog)
    dog.interval, dog.timeout_s, dog.stopped, dog.last_change = 0.0, 60.0, threading.Event(), 0.0
    in_beat = threading.Event()

    def slow_beat():  # stands in for store.set (a C++ call that releases the GIL)
        in_beat.set()
        time.sleep(0.3)
        return 0, "here"

    dog.beat = slow_beat
    monkeypatch.setattr(watchdog.dist, "is_initialized", lambda: True)
    dog.thread = threading.Thread(target=dog.run, daemon=True)
    dog.thread.start()
    monkeypatch.setattr(watchdog, "_started", dog)
    assert in_beat.wait(5)
    watchdog.stop()
    assert not dog.thread.is_alive(), "the watchdog thread outlived stop()"
    assert watchdog._started is None


@pytest.mark.slow
def test_finished_train_exits_0_every_time(tmp_path):
    """`train` under torchrun (DP2, tiny model, 2 steps) with checkpoints, evaluation and
    tensorboard all off, three times: exit code 0 each time, no abort at exit."""
    model = save_tiny_model(str(tmp_path / "model"), "qwen3", tie=True, seed=3)
    train_file, _ = write_synthetic_dataset(str(tmp_path / "data"), num_train=16, num_val=4,
                                            seed=1)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"""
model: {{hf_dir: {model}, dtype: float32, recompute_activations: false}}
rollout: {{n: 2, max_prompt_length: 64, max_response_length: 8, enforce_eager: true}}
algorithm: {{dynamic_sampling: false, overlong_buffer_len: 4}}
trainer: {{train_batch_size: 2, gen_batch_size: 2, ppo_mini_batch_size: 2, micro_batch_size: 1,
          total_steps: 2, lr: 1.0e-4, lr_warmup_steps: 1}}
data: {{train_files: [{train_file}]}}
reward: {{num_workers: 1, timeout_s: 2.0}}
eval: {{every_n_steps: 0, at_start: false}}
logging: {{tensorboard: false, plots: false, wandb: false}}
checkpoint: {{save_every: 0, export_hf_at_end: false}}
""")
    for run in range(3):
        out = tmp_path / f"run{run}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", "-m", "megatron_rlvr", "train", "--config", str(cfg),
               f"logging.output_dir={out}"]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1",
                                   "PYTHONPATH": str(ROOT)})
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"run {run}: exit {proc.returncode}\n{log[-6000:]}"
        assert "terminate called" not in log and "step 2/2" in log, log[-3000:]
        assert not os.path.exists(out / "checkpoints") and not os.path.exists(out / "tensorboard")
