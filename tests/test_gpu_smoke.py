"""`make gpu-smoke` must not rot between GPU runs: its --cpu dry run passes here, check by check."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "gpu"))
import smoke  # noqa: E402

LINE = re.compile(r"^(PASS|FAIL|SKIP) (\w+): (.*)$")


@pytest.mark.slow
def test_cpu_dry_run_passes_every_check(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "tests/gpu/smoke.py"), "--cpu",
                           "--workdir", str(tmp_path), "--budget-s", "1200"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=1500)
    results = {m.group(2): (m.group(1), m.group(3)) for m in map(LINE.match,
                                                                   proc.stdout.splitlines()) if m}
    logs = "\n".join(p.read_text()[-3000:] for p in (tmp_path / "logs").glob("*.log"))
    assert set(results) == set(smoke.CHECKS), f"{proc.stdout}\n{proc.stderr[-3000:]}"
    failed = {n: r for n, r in results.items() if r[0] == "FAIL"}
    assert not failed, f"{proc.stdout}\n{logs}"
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    # What a CPU cannot do is skipped, and only that.
    assert {n for n, (s, _) in results.items() if s == "SKIP"} <= {
        "parity_te_fp32", "parity_te_bf16", "checkpoint_memory", "vllm_colocated"}
    assert results["parity_local_fp32"][0] == results["dapo_steps"][0] == "PASS"
    assert "summary: " in proc.stdout


def test_check_names_and_groups_agree():
    assert len(smoke.CHECKS) == len(set(smoke.CHECKS)) == 10
    assert list(smoke.GROUPS) == list(smoke.TIMEOUT_S)
    assert list(smoke.GROUPS)[-1] == "vllm"  # its shutdown destroys the process group: last


@pytest.mark.slow
def test_spent_budget_fails_every_check_and_the_exit_code(tmp_path):
    """A check that did not run is a FAIL line, never a silent gap, and the run exits 1."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "tests/gpu/smoke.py"), "--cpu",
                           "--workdir", str(tmp_path), "--budget-s", "0"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    results = {m.group(2): m.group(1) for m in map(LINE.match, proc.stdout.splitlines()) if m}
    assert results == {name: "FAIL" for name in smoke.CHECKS}, proc.stdout + proc.stderr[-2000:]
    assert proc.returncode == 1
    assert "summary: 0 PASS, 10 FAIL, 0 SKIP" in proc.stdout
