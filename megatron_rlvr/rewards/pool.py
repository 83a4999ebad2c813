"""Reward scoring in worker processes with hard per-item time and memory limits.

Why processes: math-verify's own timeouts use SIGALRM, which works only in a main thread, and no
signal can interrupt sympy while it multiplies huge integers in C. So each item gets a deadline
enforced from outside: a worker past it is killed (SIGKILL) and replaced, and the item scores 0.
Workers also run under an address-space limit, so `\\boxed{10^{10^{10^{10}}}}` fails with
MemoryError instead of taking the machine's RAM. Workers come from a `forkserver` (falling back
to `spawn`), never plain fork: the trainer process holds torch and gloo threads.

    with RewardPool(num_workers=4, timeout_s=5.0) as pool:
        results = pool.score(responses, ground_truths)   # list[RewardResult]
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Literal

from .math import AnswerFormat, extract_answer
from .seed_grader import seed_extract

Grader = Literal["math_verify", "seed"]
GRADERS = ("math_verify", "seed")

# A worker that has not reported ready after this long failed to start.
_STARTUP_TIMEOUT_S = 120.0
# Workers may die while starting (e.g. OOM killer); this many in a row means they cannot start.
_MAX_FAILED_STARTS = 3


@dataclass
class RewardResult:
    score: float            # 1.0 correct, 0.0 otherwise (no answer, wrong, timed out, error)
    answer: str | None      # the extracted answer, None when the response has none
    timed_out: bool = False


def _worker_main(conn: Connection, memory_limit_mb: int, grader: Grader = "math_verify") -> None:
    """Serve (answer, ground_truth) -> bool until the pipe closes."""
    import resource

    limit = memory_limit_mb * 2 ** 20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeouts disabled" notices
    if grader == "seed":
        from .seed_grader import seed_verify as verify_answer

        verify_answer("x+1", "1+x")  # reaches sympy: import it before the clock runs, and
        verify_answer("2x", "x")     # simplify's lazy imports (sympy.physics.units, ~1-2 s)
    else:
        from .math import verify_answer

        verify_answer("1", "1")  # import and warm math-verify's parsers before the clock runs
    conn.send("ready")
    while True:
        try:
            answer, ground_truth = conn.recv()
        except EOFError:
            return
        try:
            ok = verify_answer(answer, ground_truth)
        except BaseException:  # MemoryError, RecursionError, sympy errors: the answer is wrong
            ok = False
        conn.send(ok)


def _context():
    try:
        ctx = mp.get_context("forkserver")
        # Workers fork from a server that has imported the verifier once: replacing a killed
        # worker then costs milliseconds. (Ignored if the server is already running.)
        ctx.set_forkserver_preload([__name__, "math_verify", f"{__package__}.seed_grader"])
        return ctx
    except ValueError:  # platforms without forkserver
        return mp.get_context("spawn")


class _Worker:
    def __init__(self, ctx, memory_limit_mb: int, grader: Grader):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, memory_limit_mb, grader),
                                daemon=True)
        self.proc.start()
        child.close()
        self.started = time.monotonic()
        self.ready = False
        self.item: int | None = None   # index of the item being verified
        self.deadline = 0.0

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join()
        self.conn.close()


class RewardPool:
    """`num_workers` verifier processes; `score` blocks until every item has a result.

    `grader`: "math_verify" (`math.extract_answer` with `answer_format`, then math-verify) or
    "seed" (the seed code's rules, `seed_grader`: the last box, else the whole text after
    `</think>`, graded by string normalisation + sympy; `answer_format` must be "boxed").

    `stats` counts timeouts (items over `timeout_s`) and crashes (workers that died otherwise)
    since the pool was created; each such worker has been replaced.
    """

    def __init__(self, num_workers: int, timeout_s: float, *, answer_format: AnswerFormat = "boxed",
                 memory_limit_mb: int = 2048, grader: Grader = "math_verify"):
        if num_workers < 1 or timeout_s <= 0:
            raise ValueError(f"need num_workers >= 1 and timeout_s > 0, got {num_workers}, "
                             f"{timeout_s}")
        if grader not in GRADERS:
            raise ValueError(f"unknown grader {grader!r}; use one of {GRADERS}")
        if grader == "seed" and answer_format != "boxed":
            raise ValueError(f"the seed grader reads answers its own way (last box, else the "
                             f"whole text); answer_format must be 'boxed', got {answer_format!r}")
        self.grader = grader
        self.timeout_s = timeout_s
        self.answer_format = answer_format
        self.memory_limit_mb = memory_limit_mb
        self.stats = {"timeouts": 0, "crashes": 0}
        self._failed_starts = 0  # consecutive workers that died before reporting ready
        self._ctx = _context()
        self._workers = [_Worker(self._ctx, memory_limit_mb, grader) for _ in range(num_workers)]

    def score(self, responses: list[str], ground_truths: list[str]) -> list[RewardResult]:
        if len(responses) != len(ground_truths):
            raise ValueError(f"{len(responses)} responses but {len(ground_truths)} ground truths")
        if not self._workers:
            raise RuntimeError("RewardPool is closed")
        if self.grader == "seed":
            results = [RewardResult(0.0, seed_extract(r)) for r in responses]
        else:
            results = [RewardResult(0.0, extract_answer(r, self.answer_format)) for r in responses]
        todo = deque(i for i, r in enumerate(results) if r.answer is not None)
        busy = 0
        while todo or busy:
            now = time.monotonic()
            for w in self._workers:
                if w.ready and w.item is None and todo:
                    item = todo[0]
                    try:
                        w.conn.send((results[item].answer, ground_truths[item]))
                    except OSError:  # died while idle: not the item's fault, retry it
                        self.stats["crashes"] += 1
                        self._replace(self._workers.index(w))
                        continue
                    w.item, w.deadline = todo.popleft(), now + self.timeout_s
                    busy += 1
            waits = [w.deadline if w.item is not None else w.started + _STARTUP_TIMEOUT_S
                     for w in self._workers if w.item is not None or not w.ready]
            timeout = max(0.0, min(waits) - now) if waits else None
            for conn in wait([w.conn for w in self._workers], timeout=timeout):
                i = next(k for k, w in enumerate(self._workers) if w.conn is conn)
                w = self._workers[i]
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    if not w.ready:
                        self._failed_starts += 1
                        if self._failed_starts > _MAX_FAILED_STARTS:
                            raise RuntimeError(
                                f"reward workers keep dying before they are ready (last exit "
                                f"code {w.proc.exitcode}); is reward.memory_limit_mb "
                                f"({self.memory_limit_mb}) too low?") from None
                    self.stats["crashes"] += 1
                    busy -= w.item is not None
                    self._replace(i)
                    continue
                if msg == "ready":
                    w.ready, self._failed_starts = True, 0
                else:
                    results[w.item].score = 1.0 if msg else 0.0
                    w.item = None
                    busy -= 1
            now = time.monotonic()
            for i, w in enumerate(self._workers):
                if w.item is not None and now >= w.deadline:
                    results[w.item].timed_out = True
                    self.stats["timeouts"] += 1
                    busy -= 1
                    self._replace(i)
                elif not w.ready and now >= w.started + _STARTUP_TIMEOUT_S:
                    raise RuntimeError(f"reward worker not ready after {_STARTUP_TIMEOUT_S}s")
        return results

    def _replace(self, i: int) -> None:
        self._workers[i].kill()
        self._workers[i] = _Worker(self._ctx, self.memory_limit_mb, self.grader)

    def close(self) -> None:
        for w in self._workers:
            w.kill()
        self._workers = []

    def __enter__(self) -> "RewardPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_workers", None):
            self.close()
