"""End a finished process without the interpreter's module teardown.

A process that has imported torch, Megatron-Core and vLLM spends seconds of CPU at exit tearing
down modules and collecting garbage that the OS reclaims anyway (every torchrun rank pays it).
`exit_now` does what a normal exit does that has an effect outside the process, in the same
order, then `os._exit`:

1. wait for the non-daemon threads (as the interpreter does before anything else);
2. run the `atexit` handlers (logging's flush and close, multiprocessing's stop of its children,
   wandb, ...);
3. flush stdout and stderr;
4. `os._exit(code)`: the exit code is the one given, exactly (None is 0, as for `sys.exit`).

What is skipped is the teardown itself, and so the finalizers of objects still alive at that
point: a file left open and unflushed by its owner would lose its buffer. Callers close what they
wrote before calling this (the trainer closes its logs and metrics when it returns).
"""
from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import NoReturn


def exit_now(code: int | None = 0) -> NoReturn:
    """Exit with `code` after threads, atexit handlers and stdio flushes; skip module teardown."""
    code = 0 if code is None else int(code)
    try:
        threading._shutdown()  # joins non-daemon threads, as Py_FinalizeEx does first
    except Exception:  # noqa: BLE001 - best effort: never let the exit path raise
        pass
    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            try:
                if stream is not None:
                    stream.flush()
            except Exception:  # noqa: BLE001 - a closed or broken stream: nothing to flush
                pass
        os._exit(code)
