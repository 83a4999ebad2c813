"""Time and peak extra memory of logprobs_and_entropy vs the straightforward implementation.

    .venv/bin/python benchmarks/entropy_logprob.py                 # 4096 x 151,936, TP=1 and TP=2
    .venv/bin/python benchmarks/entropy_logprob.py --tokens 512 --tp 1   # a quick look

Baseline, as verl and OpenRLHF do it: log-probs = log_softmax(logits).gather(labels) with autograd;
entropy = logsumexp(logits) - sum(softmax(logits) * logits) without gradient (the top-20% selection
needs none). With TP=2 the baseline's log-probs are Megatron-Core's vocab_parallel_cross_entropy
(on a clone: it overwrites its input) and its entropy the same formula with all-reduces.
Ours: logprobs_and_entropy(logits, labels, tp_group=...) with its default chunk size.

"forward" runs under torch.no_grad() (old-policy log-probs); "fwd+bwd" backpropagates sum(logp).
Every number comes from a fresh worker process (torchrun for TP=2), one thread per process:
- time: the median of --reps calls: one in the memory worker below, the rest in one process where
  ours and the baseline alternate (no warm-up anywhere; a call's buffers are fresh mmaps each time);
- memory: one call per process; peak extra = ru_maxrss after the call minus the RSS before it
  (logits and labels already allocated, filled in place). glibc serves these large buffers with
  mmap and unmaps them when freed, so the process's RSS follows torch's live CPU tensors. fwd+bwd
  includes logits.grad, which is as large as the logits and which any implementation must produce;
  the "beyond grad" column subtracts it.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMPLS = ("baseline", "ours")
MODES = ("forward", "fwd+bwd")


# ----------------------------------------------------------------------------- worker side

def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _baseline(logits, labels, tp_group):
    import torch
    import torch.distributed as dist
    if tp_group is None:
        logp = torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        with torch.no_grad():
            ent = torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * logits).sum(-1)
        return logp, ent
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
    with torch.no_grad():
        m = logits.amax(dim=-1)
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=tp_group)
        e = torch.exp(logits - m.unsqueeze(-1))
        sums = torch.stack([e.sum(-1), (e * logits).sum(-1)])
        dist.all_reduce(sums, group=tp_group)
        ent = m + sums[0].log() - sums[1] / sums[0]
    logp = -vocab_parallel_cross_entropy(logits.clone(), labels)
    return logp, ent


def _call(impl, mode, logits, labels, tp_group):
    import torch
    from megatron_rlvr.ops import logprobs_and_entropy
    x = logits.detach().requires_grad_(mode == "fwd+bwd")
    with torch.set_grad_enabled(mode == "fwd+bwd"):
        if impl == "ours":
            logp, ent = logprobs_and_entropy(x, labels, tp_group=tp_group)
        else:
            logp, ent = _baseline(x, labels, tp_group)
        if mode == "fwd+bwd":
            logp.sum().backward()
    return x.grad


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    tp_group = None
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
        from megatron.core import parallel_state
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=dist.get_world_size())
        tp_group = parallel_state.get_tensor_model_parallel_group()
    tp = dist.get_world_size() if tp_group is not None else 1
    gen = torch.Generator().manual_seed(0)
    logits = torch.empty(args.tokens, args.vocab // tp).uniform_(-4, 4, generator=gen)
    labels = torch.randint(0, args.vocab, (args.tokens,), generator=gen)
    if args.worker == "memory":
        before, start = _rss_bytes(), time.perf_counter()
        grad = _call(args.impl, args.mode, logits, labels, tp_group)
        result = {"time": time.perf_counter() - start, "extra": _max_rss_bytes() - before,
                  "grad": 0 if grad is None else grad.numel() * grad.element_size()}
    else:
        times = {(i, m): [] for i in IMPLS for m in MODES}
        for _ in range(args.reps - 1):
            for key in times:
                if tp_group is not None:
                    dist.barrier(tp_group)
                start = time.perf_counter()
                _call(*key, logits, labels, tp_group)
                times[key].append(time.perf_counter() - start)
        result = {f"{i}|{m}": t for (i, m), t in times.items()}
    result["logits"] = logits.numel() * logits.element_size()
    if tp_group is None or dist.get_rank() == 0:
        print("RESULT " + json.dumps(result), flush=True)
    if tp_group is not None:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- driver side

def run_worker(args, tp: int, *extra: str) -> dict:
    script = [str(Path(__file__).resolve()), "--tokens", str(args.tokens), "--vocab",
              str(args.vocab), "--reps", str(args.reps), *extra]
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc_per_node={tp}"] if tp > 1 else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(launcher + script, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"worker {extra} at TP={tp} failed ({proc.returncode}):\n"
                 f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--reps", type=int, default=3, help="timed calls of each kind (>= 1)")
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    p.add_argument("--worker", choices=["time", "memory"], help=argparse.SUPPRESS)
    p.add_argument("--impl", choices=IMPLS, help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.reps < 1 or args.tokens < 1:
        sys.exit(f"--reps and --tokens must be >= 1, got {args.reps} and {args.tokens}")
    for tp in args.tp:
        if args.vocab % tp:
            sys.exit(f"--vocab {args.vocab} is not divisible by TP={tp}")
    gib = 2 ** 30
    print(f"{args.tokens} tokens x {args.vocab} vocab, float32, median of {args.reps}, "
          "1 thread per process; memory per rank")
    print("| TP | pass | baseline s | ours s | time ours/base | baseline extra GiB | "
          "ours extra GiB | extra beyond grad / logits: baseline | ours |")
    print("|---|---|---|---|---|---|---|---|---|")
    for tp in args.tp:
        times = run_worker(args, tp, "--worker", "time") if args.reps > 1 else {}
        for mode in MODES:
            mem = {impl: run_worker(args, tp, "--worker", "memory", "--impl", impl,
                                    "--mode", mode) for impl in IMPLS}
            base_t, ours_t = (statistics.median(times.get(f"{i}|{mode}", []) + [mem[i]["time"]])
                              for i in IMPLS)
            beyond = {i: (m["extra"] - m["grad"]) / m["logits"] for i, m in mem.items()}
            print(f"| {tp} | {mode} | {base_t:.2f} | {ours_t:.2f} | {ours_t / base_t:.2f} | "
                  f"{mem['baseline']['extra'] / gib:.2f} | {mem['ours']['extra'] / gib:.2f} | "
                  f"{beyond['baseline']:.0%} | {beyond['ours']:.1%} |", flush=True)
    print(f"logits per rank: {args.vocab * args.tokens * 4 / gib:.2f} GiB at TP=1")


if __name__ == "__main__":
    main()
