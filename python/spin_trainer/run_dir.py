"""The run's --out directory: checked and created before the run, locked for the run's lifetime,
and removed again when a refused run created it and left nothing in it.

The lock is an exclusive `flock` on OUT/.lock taken by rank 0, a worker process: SIGKILL to
torchrun leaves its workers running (they are in sessions of their own), and a lock held by the
launcher would be released while they still write. Every rank waits for rank 0's verdict (a
collective) before anything is written, so the ranks of a second launch into the same --out are
all refused together. The kernel releases the lock when the holder exits, however it exits.
"""
import fcntl
import os
import shutil
import socket
import tempfile
import time
from contextlib import suppress
from pathlib import Path

from .checkpoint import CHECKPOINTS_DIR
from .errors import UsageError, option
from .manifest import all_ranks
from .options import CONFIG_HEADER

TOKENIZED_DIR = "tokenized"   # the tokenized-data cache (data.py), which a refused run may leave
LOCK_FILE = ".lock"
WRITE_PROBE = ".write-test-"   # each rank's check that --out is writable, removed at once
CONFIG_FILE = "config.yaml"   # the run's resolved settings, written once its model has loaded


def is_a_runs(path):
    """Whether the existing directory `path` is empty or an earlier run's: its config.yaml, its
    checkpoints, or what a run refused before its model loaded leaves (the lock, the data cache)."""
    # (the other ranks' write probes, made at the same moment, do not count)
    names = {name for name in os.listdir(path) if not name.startswith(WRITE_PROBE)}
    if names <= {LOCK_FILE, TOKENIZED_DIR} or CHECKPOINTS_DIR in names:
        return True
    try:
        with open(os.path.join(path, CONFIG_FILE), encoding="utf-8") as f:
            return f.readline() == CONFIG_HEADER
    except (OSError, UnicodeDecodeError):
        return False


def check_output_path(out):
    """The output directory must be one this process can write; it is created if missing.
    Returns whether this call created it."""
    path = os.path.abspath(out)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{option('out')} {out!r} is a file, not a directory")
    if os.path.isdir(path) and not is_a_runs(path):
        # A run writes config.yaml, metrics.jsonl, final/ ... there: a user's own files would be replaced.
        shown = ", ".join(sorted(name for name in os.listdir(path) if not name.startswith(WRITE_PROBE))[:3])
        raise UsageError(f"{option('out')} {out!r} holds files that are not a run's ({shown}, ...); choose a new or "
                         f"empty directory, or an earlier run's")
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f"{option('out')} {out!r} lies under {existing!r}, which is a file")
    created = not os.path.exists(path)
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(prefix=WRITE_PROBE, dir=path):   # unnamed where the filesystem can
            pass
    except OSError as exc:
        raise UsageError(f"{option('out')} {out!r} is not writable ({exc.strerror or exc})") from exc
    return created


def remove_if_empty(out):
    """Removes `out`, which this run created, if it holds nothing but the lock file and the tokenized
    data cache (a run refused before training)."""
    with suppress(OSError):   # someone else's file appeared in it: it is not ours to remove
        if set(os.listdir(out)) <= {LOCK_FILE, TOKENIZED_DIR}:
            shutil.rmtree(os.path.join(out, TOKENIZED_DIR), ignore_errors=True)
            Path(out, LOCK_FILE).unlink(missing_ok=True)
            os.rmdir(out)


def lock_run(out, ctx):
    """Takes the exclusive lock on `out` (all ranks call this) or refuses, naming the holder. Returns
    the lock's file descriptor on rank 0 (closing it releases the lock), None on the other ranks."""
    fd, holder = None, None
    if ctx.is_main:
        fd = os.open(os.path.join(out, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode("utf-8", "replace").strip() or "a process that did not say"
            os.close(fd)
            fd = None
        else:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}, since "
                         f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n".encode())
    if any(all_ranks([ctx.is_main and fd is None], ctx)):   # refused on rank 0
        raise UsageError(f"{option('out')} {out!r} is in use by another run ({holder or 'see rank 0'}); wait for "
                         f"it to finish or stop it, or use another {option('out')}")
    return fd
