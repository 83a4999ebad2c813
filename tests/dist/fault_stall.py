"""A rank that dies or hangs mid-run: every rank must be gone soon, naming the culprit.

Each rank initialises through parallel.init_distributed (with the stall watchdog) and loops
all-reduces, checking each result. At iteration 20 the rank given by --culprit either SIGKILLs
itself (`kill`) or stops taking part and sleeps forever (`hang`); with `finish` every rank
stops at iteration 20, tears the process groups down and lingers: a finished run is no stall. The pytest side asserts on
torchrun's exit status, its output and the timing; this script prints what it needs for that.
"""
import argparse
import os
import signal
import time

import torch
import torch.distributed as dist

from megatron_rlvr import platform, watchdog
from megatron_rlvr.parallel import destroy_distributed, init_distributed
from megatron_rlvr.fast_exit import exit_now

p = argparse.ArgumentParser()
p.add_argument("mode", choices=("kill", "hang", "finish"))
p.add_argument("--culprit", type=int, default=1)
p.add_argument("--timeout-s", type=float, default=6.0)
args = p.parse_args()


def say(line: str) -> None:
    """One write per line: print() writes the text and the newline separately, and the ranks
    share torchrun's stdout."""
    os.write(1, (line + "\n").encode())


init_distributed(1, 1, 1, timeout_s=args.timeout_s, watchdog=True)
rank, world = dist.get_rank(), dist.get_world_size()
say(f"PID rank={rank} pid={os.getpid()}")
x = torch.zeros(8, device=platform.device())  # training groups reduce device tensors (NCCL)
for i in range(10 ** 9):
    if i == 20 and args.mode == "finish":
        destroy_distributed()
        time.sleep(args.timeout_s + 2 * watchdog.heartbeat_interval(args.timeout_s))
        say(f"FINISHED rank={rank}")
        break
    if i == 20 and rank == args.culprit:
        say(f"STALL at={time.time():.3f} mode={args.mode} rank={rank}")
        if args.mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        while True:
            time.sleep(0.05)
    x.fill_(rank + i)
    dist.all_reduce(x)
    expected = world * i + world * (world - 1) / 2
    assert torch.all(x == expected), (rank, i, x)
    time.sleep(0.01)
exit_now(0)  # `finish`: without the interpreter's teardown
