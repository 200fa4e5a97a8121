"""A checkpoint's manifest.json: the size and SHA-256 of every file, written last (after every
file is fsynced), so that a checkpoint with a missing, cut or altered file is recognised on load.
Every rank hashes a share of the files, on save and on load.

Also the one rule of the rank-0 writes of a checkpoint: an OSError there (ENOSPC) is raised on
every rank, so that no rank waits at a barrier for a rank that failed.
"""
import hashlib
import json
import os
from contextlib import contextmanager

import torch.distributed as dist

MANIFEST = "manifest.json"


def sha256_of(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@contextmanager
def replaced_atomically(path, mode="w"):
    """A file to write that replaces `path` once it is written and fsynced: a crash leaves the old
    file or the new one, never half of one."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
        yield f
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_path(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def files_under(directory):
    return sorted(os.path.relpath(os.path.join(parent, name), directory)
                  for parent, _, names in os.walk(directory) for name in names)


def all_ranks(items, ctx):
    """Every rank's list of picklable items, concatenated in rank order, on every rank."""
    if ctx.world_size == 1:
        return list(items)
    gathered = [None] * ctx.world_size
    dist.all_gather_object(gathered, list(items))
    return [item for part in gathered for item in part]


def on_main(write, ctx):
    """Runs `write()` on rank 0; every rank returns once it is done (a collective), and an OSError
    it raises is raised on every rank."""
    error, failure = None, None
    if ctx.is_main:
        try:
            write()
        except OSError as exc:
            error, failure = exc, (exc.errno, exc.strerror, exc.filename)
    failure = all_ranks([failure] if ctx.is_main else [], ctx)[0]   # rank 0's, on every rank
    if failure is not None:
        raise error or OSError(*failure)


def write_manifest(directory, ctx, **header):
    """Hashes `directory`'s files (a share on each rank) and writes manifest.json (rank 0), fsynced
    with every directory under it. All ranks call this."""
    files = all_ranks([files_under(directory)] if ctx.is_main else [], ctx)[0]
    mine = [(name, os.path.getsize(os.path.join(directory, name)), sha256_of(os.path.join(directory, name)))
            for name in files[ctx.rank::ctx.world_size]]
    entries = all_ranks(mine, ctx)

    def write():
        manifest = {**header, "files": {name: {"bytes": size, "sha256": digest}
                                        for name, size, digest in sorted(entries)}}
        with replaced_atomically(os.path.join(directory, MANIFEST)) as f:
            json.dump(manifest, f, indent=1)
        for parent, _, _ in os.walk(directory):
            fsync_path(parent)
    on_main(write, ctx)


def read_manifest(path):
    """(manifest, None) or (None, what is wrong with it)."""
    try:
        with open(os.path.join(path, MANIFEST), encoding="utf-8") as f:
            manifest = json.load(f)
    except (FileNotFoundError, IsADirectoryError):
        return None, "manifest.json is missing (half-written)"
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return None, f"manifest.json is unreadable ({exc})"
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(
            isinstance(e, dict) and isinstance(e.get("bytes"), int) and isinstance(e.get("sha256"), str)
            for e in files.values()):
        return None, "manifest.json is unreadable (no table of files with sizes and SHA-256)"
    return manifest, None


def files_problem(path, manifest, required, ctx):
    """None if the `required` files are listed, every listed file is present, and this rank's share
    of them matches the manifest; else what is wrong."""
    listed = sorted(manifest["files"])
    present = set(files_under(path)) - {MANIFEST}
    missing = [name for name in listed if name not in present] + [name for name in required if name not in listed]
    if missing:
        return f"{missing[0]} is missing"
    for name in listed[ctx.rank::ctx.world_size]:
        full, expected = os.path.join(path, name), manifest["files"][name]
        if os.path.getsize(full) != expected["bytes"]:
            return f"{name} has {os.path.getsize(full)} bytes, the manifest says {expected['bytes']}"
        if sha256_of(full) != expected["sha256"]:
            return f"{name} does not match its SHA-256 in the manifest"
    return None
