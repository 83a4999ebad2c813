"""Stall watchdog: when a rank waits too long for its peers, name the rank that stopped.

A hung rank (deadlock, stuck I/O, a GPU that stopped answering) leaves every other rank blocked in
its next collective. The backends do end that wait after their timeout (gloo raises, NCCL's
watchdog aborts), and torchrun then stops the rest, but its summary names the first rank that
*exited*: one of the innocent waiters. This module names the culprit.

Every rank runs a daemon thread that publishes, every `interval` seconds, a heartbeat to the
rendezvous store (the TCPStore at MASTER_ADDR:MASTER_PORT that torchrun or rank 0 hosts): the wall
time, how many collectives the rank has issued on the default group, and where its main thread is.
When the main thread has neither issued a collective nor moved for `timeout_s`, the thread reads
every rank's heartbeat and prints a report naming the suspects:
  - ranks with no heartbeat for 3 intervals: dead, frozen, holding the GIL, or on an unreachable
    host;
  - ranks that issued fewer collectives than the others: they never reached the collective the
    others wait in;
  - otherwise (everyone stalled at the same count, e.g. in a sub-group collective), ranks whose
    main thread is somewhere else than the reporting rank's.
Then it ends its process with exit code 124, and torchrun stops the others. The backend's own
timeout is set later than the watchdog's (`backend_timeout_s`) and stays as a backstop.

A rank that dies outright (killed, out of memory, segfault) is reported by torchrun itself: its
agent sees the exit within 0.1 s and names the rank and signal as the root cause; on other nodes
the survivors stall and this watchdog names the dead rank from its missing heartbeats.
"""
from __future__ import annotations

import datetime
import json
import os
import sys
import threading
import time

import torch.distributed as dist

EXIT_CODE = 124
_PREFIX = "megatron_rlvr/watchdog/"
_started: "Watchdog | None" = None


_progress = 0


def progress() -> None:
    """The main thread is alive and waiting on purpose (a disaggregated rank 0 for its rollout,
    its peers for rank 0's heartbeat broadcasts): not a stall, though no training collective runs."""
    global _progress
    _progress += 1


# What a collective raises on a rank whose peer process has ended (gloo, NCCL): that peer's own
# error is the cause, this rank's traceback only repeats it.
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
              "remote process exited", "NCCL communicator was aborted")


def peer_gone(e: BaseException) -> bool:
    return isinstance(e, RuntimeError) and any(m in str(e) for m in _PEER_GONE)


def heartbeat_interval(timeout_s: float) -> float:
    return min(30.0, max(0.5, timeout_s / 5))


def backend_timeout_s(timeout_s: float) -> float:
    """The process group's collective timeout: after the watchdog has had time to report."""
    return timeout_s + 3 * heartbeat_interval(timeout_s) + 10


def start(timeout_s: float) -> "Watchdog":
    """Start this rank's watchdog (once per process); needs torch.distributed initialised."""
    global _started
    if _started is None:
        _started = Watchdog(timeout_s)
        _started.beat()                     # every live rank has a heartbeat before training
        _started.thread = threading.Thread(target=_started.run, name="megatron_rlvr-watchdog",
                                           daemon=True)
        _started.thread.start()
    return _started


def stop(join_timeout_s: float = 30.0) -> None:
    """Stop the watchdog and wait for its thread to end, before the process groups go (a finished
    run is not a stall).

    The join matters: a daemon thread still alive when the interpreter exits is ended inside
    whatever it is doing, and if that is a torch C++ call that released the GIL (the heartbeat's
    `store.set`), Python's exit unwinds through C++ and the process dies with "terminate called
    without an active exception" (SIGABRT) after a run that had finished."""
    global _started
    if _started is not None:
        dog, _started = _started, None
        dog.stopped.set()
        if dog.thread is not None and dog.thread is not threading.current_thread():
            dog.thread.join(join_timeout_s)


_PLATFORM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "platform")


def _library(path: str) -> bool:
    return "site-packages" in path or path.startswith(_PLATFORM)


def _where(frame) -> str:
    """The innermost frame, and the innermost frame of the program (outside installed packages
    and our torch-function layer)."""
    def fmt(f):
        path = f.f_code.co_filename
        short = "/".join(path.split(os.sep)[-3:]) if "site-packages" in path \
            else os.path.relpath(path)
        return f"{f.f_code.co_name} ({short}:{f.f_lineno})"
    inner, caller = fmt(frame), None
    f = frame
    while f is not None and caller is None:
        if not _library(f.f_code.co_filename):
            caller = fmt(f)
        f = f.f_back
    return inner if caller in (None, inner) else f"{inner} <- {caller}"


class Watchdog:
    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.interval = heartbeat_interval(timeout_s)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                              is_master=False, timeout=datetime.timedelta(seconds=60))
        self.store = dist.PrefixStore(_PREFIX, store)
        self.group = dist.distributed_c10d._get_default_group()
        self.main = threading.main_thread()
        self.last_change = time.monotonic()
        self.state = None
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None

    def _sample(self) -> tuple[int, tuple, str]:
        frame = sys._current_frames().get(self.main.ident)
        stack = []
        f = frame
        while f is not None:
            stack.append((f.f_code.co_filename, f.f_lineno))
            f = f.f_back
        return (self.group._get_sequence_number_for_group(), tuple(stack),
                _where(frame) if frame is not None else "<main thread ended>")

    def beat(self) -> tuple[int, str]:
        seq, stack, where = self._sample()
        if (seq, stack, _progress) != self.state:
            self.state, self.last_change = (seq, stack, _progress), time.monotonic()
        self.store.set(f"hb/{self.rank}", json.dumps({"t": time.time(), "seq": seq,
                                                      "where": where}))
        return seq, where

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                if not dist.is_initialized():  # torn down without stop(): nothing to watch
                    return
                seq, where = self.beat()
                if time.monotonic() - self.last_change >= self.timeout_s:
                    self._report_and_exit(seq, where)
            except Exception as e:  # the store is gone: its host (rank 0's node) died
                if self.stopped.is_set():
                    return
                self._exit(f"rank {self.rank}: cannot reach the rendezvous store at "
                           f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} "
                           f"({e}); the node hosting it is probably down")

    def _peers(self) -> dict[int, dict | None]:
        keys = [f"hb/{r}" for r in range(self.world)]
        present = [k for k in keys if self.store.check([k])]
        values = dict(zip(present, self.store.multi_get(present))) if present else {}
        return {r: json.loads(values[k]) if k in values else None for r, k in enumerate(keys)}

    def suspects(self, peers: dict[int, dict | None], seq: int, where: str) -> dict[int, str]:
        """rank -> why it is suspected; see the module docstring for the rules."""
        now, stale = time.time(), 3 * self.interval
        out = {}
        for r, hb in peers.items():
            if hb is None:
                out[r] = "never sent a heartbeat (died or hung during start-up)"
            elif now - hb["t"] > stale:
                out[r] = (f"no heartbeat for {now - hb['t']:.0f} s: dead, frozen or unreachable "
                          f"(last seen at {hb['where']})")
        live = {r: hb for r, hb in peers.items() if r not in out}
        top = max([hb["seq"] for hb in live.values()] + [seq])
        for r, hb in live.items():
            if hb["seq"] < top:
                out[r] = (f"behind: issued {hb['seq']} collectives, others {top}; "
                          f"now at {hb['where']}")
        if not out:
            out = {r: f"at {hb['where']}" for r, hb in live.items() if hb["where"] != where}
        return out

    def _report_and_exit(self, seq: int, where: str) -> None:
        waited = time.monotonic() - self.last_change
        head = (f"[watchdog] rank {self.rank} made no progress for {waited:.0f} s "
                f"(collective_timeout_s={self.timeout_s:g}) at {where}")
        peers = self._peers()
        bad = self.suspects(peers, seq, where)
        if self.store.add("reported", 1) > 1:   # one full report per run is enough
            self._exit(head + "; another rank reported the suspects")
        if bad:
            lines = [f"[watchdog] suspect rank {r}: {why}" for r, why in sorted(bad.items())]
        else:
            lines = ["[watchdog] no rank stands out: every rank stalled at the same place"]
        self._exit("\n".join([head] + lines))

    def _exit(self, message: str) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.write(2, (message + "\n").encode())   # one write: ranks share torchrun's stderr
        os._exit(EXIT_CODE)
