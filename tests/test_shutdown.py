"""A finished run exits 0: nothing left running at exit (issue 11).

The SIGABRT seen once after the last step of a torchrun run ("terminate called without an active
exception") is what happens when a daemon thread is inside a torch C++ call that released the GIL
while the interpreter exits: Python ends the thread by unwinding through C++ frames, which aborts
(a daemon thread looping on `TCPStore.set` reproduces it on every exit). The stall watchdog's
heartbeat thread (`store.set`) was such a thread: `watchdog.stop()` now waits for it to end, and
the trainer stops it first when it closes.
"""
import threading
import time

from megatron_rlvr import watchdog


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
