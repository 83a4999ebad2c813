"""Guards shared by every tool that writes files, and the one-line error of every command line.

Output directories (`check_output_dir`), checked before any heavy work:
  - never empty, the file system root, the home directory, or the working directory (or one of
    its parents): an unset shell variable must not turn `--out-dir "$X" --overwrite` into the
    deletion of the repository it runs from;
  - never equal to, inside, or containing an input of the same command (nor is an input where
    the writer keeps its temporary `<out>.incomplete` / `<out>.old` directories);
  - an existing directory is replaced only with `--overwrite`, and only if it is empty or this
    project wrote it: it carries our marker (`MARKER`, or `megatron_rlvr.json` in a Megatron
    checkpoint). Everything we write as a directory gets the marker;
  - the place it goes must be writable: probed by creating (and removing) a directory there,
    which also catches read-only file systems, quotas and a file where a directory should be.

Command lines (`run_cli`): a user's mistake (ValueError and its subclasses: bad config, bad
checkpoint, bad row, undecodable bytes; and the file-system errors a user causes: missing,
unreadable, not a directory, read-only, disk full) ends with one line, `<prog>: error: <what>`,
naming the file, field or flag, and exit code 2. `MEGATRON_RLVR_DEBUG=1` shows the traceback.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import tempfile
import time

MARKER = ".megatron_rlvr_output"
# A Megatron checkpoint saved by megatron_rlvr.checkpoint carries its metadata file: ours too.
OTHER_MARKERS = ("megatron_rlvr.json",)
TEMP_SUFFIXES = (".incomplete", ".old")  # siblings that writers create and delete
DEBUG_ENV = "MEGATRON_RLVR_DEBUG"


class UnsafeOutputError(ValueError):
    """An output path that could destroy data or cannot be written; names the flag and path."""


# ------------------------------------------------------------------------------------ markers

def is_ours(path: str) -> bool:
    """Whether directory `path` was written by this project (carries a marker)."""
    return any(os.path.isfile(os.path.join(path, m)) for m in (MARKER, *OTHER_MARKERS))


def write_marker(directory: str, tool: str) -> None:
    """Mark `directory` as written by this project, so that `--overwrite` may replace it."""
    with open(os.path.join(directory, MARKER), "w") as f:
        json.dump({"written_by": f"megatron-rlvr {tool}", "time": time.time()}, f)
        f.write("\n")


# ------------------------------------------------------------------------------------ paths

def _real(path: str) -> str:
    return os.path.realpath(os.path.expanduser(path))


def _relation(a: str, b: str) -> str | None:
    """How resolved path `a` relates to resolved path `b`, or None if they are disjoint."""
    if a == b:
        return "is"
    if a.startswith(b.rstrip(os.sep) + os.sep):
        return "is inside"
    if b.startswith(a.rstrip(os.sep) + os.sep):
        return "contains"
    return None


def _root_like(real: str) -> str | None:
    if real == os.path.realpath(os.sep):
        return "the file system root"
    if real == _real("~"):
        return "your home directory"
    cwd = os.path.realpath(os.getcwd())
    if real == cwd:
        return "the working directory"
    if _relation(real, cwd) == "contains":
        return "a parent of the working directory"
    return None


def check_input_path(path: str | None, flag: str, *, kind: str = "directory") -> str:
    """An input that must exist as a `kind` ("directory" or "file"); clear errors otherwise."""
    if path is None or not str(path).strip():
        raise UnsafeOutputError(f"{flag} is empty")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{flag} {path}: no such {kind}")
    if kind == "directory" and not os.path.isdir(path):
        raise NotADirectoryError(f"{flag} {path}: not a directory")
    if kind == "file" and not os.path.isfile(path):
        raise IsADirectoryError(f"{flag} {path}: not a file")
    return path


def check_writable(path: str, flag: str) -> None:
    """Can `path` (a directory, existing or not) be created or written? Probes the nearest
    existing ancestor by creating a directory in it."""
    real = _real(path)
    probe_in = real
    while not os.path.lexists(probe_in):
        probe_in = os.path.dirname(probe_in)
    if not os.path.isdir(probe_in):
        raise UnsafeOutputError(f"{flag} {path}: {probe_in} is a file, not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".megatron_rlvr_probe_", dir=probe_in))
    except OSError as e:
        raise UnsafeOutputError(f"{flag} {path}: cannot write in {probe_in}: "
                                f"{e.strerror or e}") from None


def check_output_dir(out: str | None, *, flag: str, inputs: list[tuple[str, str]] = (),
                     overwrite: bool = False) -> str:
    """Refuse an output directory that could destroy data or cannot be written (see the module
    docstring). `inputs`: (flag, path) of every input of the command. Returns `out`."""
    if out is None or not str(out).strip():
        raise UnsafeOutputError(f"{flag} is empty; give the directory to create")
    real = _real(out)
    what = _root_like(real)
    if what:
        raise UnsafeOutputError(f"{flag} {out} is {what}; refusing to write (or replace) it: "
                                "give a new directory")
    for in_flag, in_path in inputs:
        if not in_path:
            continue
        in_real = _real(in_path)
        for candidate, label in ((real, ""), *((real + s, f" (its temporary {s} directory)")
                                               for s in TEMP_SUFFIXES)):
            rel = _relation(candidate, in_real)
            if rel:
                where = {"is": "is the same path as", "is inside": "is inside",
                         "contains": "contains"}[rel]
                raise UnsafeOutputError(f"{flag} {out}{label} {where} the input {in_flag} "
                                        f"{in_path}; writing there would destroy the input: "
                                        "choose another output directory")
    if os.path.lexists(real) and not os.path.isdir(real):
        raise UnsafeOutputError(f"{flag} {out} exists and is not a directory")
    if os.path.isdir(real):
        if not overwrite:
            raise FileExistsError(f"output directory {out} already exists; pass --overwrite to "
                                  "replace it")
        if os.listdir(real) and not is_ours(real):
            raise UnsafeOutputError(
                f"{flag} {out} exists and was not written by megatron-rlvr (no {MARKER}); "
                "--overwrite replaces only directories this project wrote: remove it yourself "
                "or choose another directory")
    check_writable(real, flag)
    return out


# --------------------------------------------------------------------------- command lines

# File-system errors a user causes (wrong path, permissions, full or read-only disk); other
# OSErrors (a peer's connection reset, ...) are failures of the system and keep their traceback.
_USER_ERRNOS = {errno.ENOENT, errno.EEXIST, errno.EACCES, errno.EPERM, errno.ENOTDIR,
                errno.EISDIR, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENAMETOOLONG,
                errno.ELOOP, errno.EXDEV}


def is_user_error(e: BaseException) -> bool:
    if isinstance(e, ValueError):
        return True
    if isinstance(e, (FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError,
                      IsADirectoryError)):
        return True
    return isinstance(e, OSError) and e.errno in _USER_ERRNOS


def one_line(e: BaseException) -> str:
    """The error as one line (file-system errors as `<path>: <reason>`)."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        text = f"{e.filename}: {e.strerror}"
        if e.filename2 is not None:
            text += f" (-> {e.filename2})"
    elif isinstance(e, UnicodeDecodeError):
        text = f"undecodable bytes ({e.encoding}: {e.reason} at byte {e.start})"
    else:
        text = str(e) or type(e).__name__
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def run_cli(prog: str, fn, *args, **kwargs) -> int:
    """`fn(*args, **kwargs)`; a user's mistake becomes one `<prog>: error: ...` line, exit 2."""
    try:
        return fn(*args, **kwargs)
    except (ValueError, OSError) as e:
        if not is_user_error(e) or os.environ.get(DEBUG_ENV):
            raise
        print(f"{prog}: error: {one_line(e)} (set {DEBUG_ENV}=1 for the traceback)",
              file=sys.stderr, flush=True)
        return 2


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (`<prog>: error: ...`), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    import math
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value
