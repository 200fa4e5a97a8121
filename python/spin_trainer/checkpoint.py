"""Checkpoints through torch.distributed.checkpoint (DCP): never half-written, resumable onto
another number of processes or another --tp.

A checkpoint is a directory `step-00000042/`:

    model/          DCP: {"model", "optimizer"} from `get_state_dict` (each rank writes its shards)
    reference/      DCP: θ_t's weights, where the reference mode keeps them and an iteration is in progress
    loop.json       rank 0: the loop's state (position, cached generations and reference log-probs,
    loop.safetensors    previous pairs, scheduler, eval rows, settings, fingerprints, every rank's RNG
                    states), in files that cannot run code when read (state_file.py)
    manifest.json   sizes and SHA-256 of every file (manifest.py)

It is written into `.tmp-step-00000042/`, every file fsynced, and renamed into place when complete.
On load a checkpoint whose manifest or files are missing, unreadable or mismatching is reported,
moved aside to `step-00000042.corrupt` (never deleted, never counted among the `--keep` kept ones)
and the previous one is used; with none left, --resume is refused (a run never starts over
silently). Pruning keeps the newest `--keep`, always including the one just written. A full disk
removes the partial checkpoint and says which one is intact.

Resharding is PyTorch's: DCP stores each tensor's global shape and every shard's offsets, and
`set_state_dict` loads them into this run's layout; we write no resharding code. A checkpoint whose
tensors do not fit this model (another model, another vocabulary) is refused before anything loads.

At the same world size and --tp a resumed run reproduces the uninterrupted one bit for bit. At
another, every saved state is restored exactly, but later steps add gradients in another order
(all-reduce over other ranks, matmuls split another way), so the weights drift apart by float
rounding (float32: relative 1e-6 after a few steps). Rank r takes saved rank r mod N's RNG states;
the loop draws no global random numbers: batch order and sampling noise have their own seeds, the
noise keyed by each prompt's index, not by the rank (rollouts.sampling_seed), so sampled responses
stay the same unless that rounding flips a near-tie.
"""
import errno
import os
import random
import shutil
import warnings
from collections import namedtuple

import torch
from torch.distributed.checkpoint import CheckpointException, FileSystemReader, FileSystemWriter, load, save
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

from spin_kernels.dtensor import local_tensor

from .errors import CheckpointNotWritten, TrainingDiverged, UsageError, option
from .manifest import all_ranks, files_problem, fsync_path, on_main, read_manifest, write_manifest
from .state_file import STRUCTURE_FILE, TENSORS_FILE, read_state, write_state

PREFIX = "step-"
CORRUPT_SUFFIX = ".corrupt"
PICKLED_LOOP_FILE = "loop.pt"   # the loop state of older versions: a pickle, never read
TRAIN_DIR = "model"
REFERENCE_DIR = "reference"
# The optimizer's state keyed by parameter name, not by parameter-group index: the groups follow the
# device meshes (spin_trainer.optim), so another process count or --tp has another number of groups.
FLAT_OPTIMIZER = StateDictOptions(flatten_optimizer_state_dict=True)


Checkpoint = namedtuple("Checkpoint", ["path", "loop_state"])   # an intact one found for --resume
CHECKPOINTS_DIR = "checkpoints"


def checkpoint_root(out, run="spin"):
    """Where a run writes its checkpoints: OUT/checkpoints/RUN (the command line's run is "spin")."""
    return os.path.join(out, CHECKPOINTS_DIR, run)


def list_checkpoints(root):
    """Checkpoint directories under `root` (corrupt ones moved aside excluded), oldest first."""
    if not os.path.isdir(root):
        return []
    names = [n for n in os.listdir(root) if n.startswith(PREFIX) and n[len(PREFIX):].isdigit()]
    return [os.path.join(root, n) for n in sorted(names, key=lambda n: int(n[len(PREFIX):]))]


def replace_directory(new, final):
    """Renames `new` to `final`; an existing `final` stays intact until the new one is in place."""
    previous = f"{final}.previous-{os.getpid()}"
    if os.path.exists(final):
        os.rename(final, previous)
    os.rename(new, final)
    fsync_path(os.path.dirname(os.path.abspath(final)))
    shutil.rmtree(previous, ignore_errors=True)


# ---- saving --------------------------------------------------------------------------------------------
def fresh_directory(path, ctx):
    """An empty directory at `path` (a leftover of an interrupted write is removed first), made by
    rank 0 and seen by every rank when this returns; returns `path`."""
    if ctx.is_main:
        if os.path.exists(path):
            shutil.rmtree(path)
        os.makedirs(path)
    ctx.barrier()
    return path


def dcp(operation, state_dict, ctx, **storage):
    """DCP's `save` or `load` of `state_dict` with `storage` (its storage_writer or storage_reader);
    `load` loads into the state dict's tensors in place (their layout: this run's). DCP warns on every
    call of a run without a process group that it assumes one process: that is what a one-process run
    means, so the warning says nothing."""
    with warnings.catch_warnings():
        if ctx.world_size == 1:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        operation(state_dict, no_dist=ctx.world_size == 1, **storage)


def train_state(model, optimizer):
    model_state, optimizer_state = get_state_dict(model, optimizer, options=FLAT_OPTIMIZER)
    return {"model": model_state, "optimizer": optimizer_state}


def save_train_state(directory, model, optimizer, ctx):
    """{"model", "optimizer"} state dicts to DCP `directory`; an optimizer that has not stepped yet
    has no state to save (asking DCP for it would initialise it with a zero step and change the run)."""
    state = train_state(model, optimizer) if optimizer.state else {"model": get_model_state_dict(model)}
    dcp(save, state, ctx, storage_writer=FileSystemWriter(directory, sync_files=True))


def load_weights(module, directory, ctx, key=None):
    """Loads `module`'s weights from DCP `directory` (saved under `key`, if given) into its layout."""
    state = get_model_state_dict(module)
    dcp(load, {key: state} if key else state, ctx, storage_reader=FileSystemReader(directory))
    set_model_state_dict(module, state)


def load_train_state(directory, model, optimizer, ctx):
    """Loads model and (if saved) optimizer state from `directory`, resharded to this run's layout."""
    saved = FileSystemReader(directory).read_metadata().state_dict_metadata
    if not any(key.startswith("optimizer.") for key in saved):
        return load_weights(model, directory, ctx, key="model")
    state = train_state(model, optimizer)
    dcp(load, state, ctx, storage_reader=FileSystemReader(directory))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=FLAT_OPTIMIZER)


def save_checkpoint(root, step, *, model, optimizer, reference, loop_state, ctx, keep):
    """Writes checkpoint `step` atomically (all ranks call this); returns its path. A full disk is
    a CheckpointNotWritten that says so and names the intact checkpoint (the partial one is removed).

    `reference`: None, or a function returning a context manager that yields the module holding θ_t
    (or None where the mode keeps no weights).
    """
    final = os.path.join(root, f"{PREFIX}{step:08d}")
    tmp = fresh_directory(os.path.join(root, f".tmp-{PREFIX}{step:08d}"), ctx)
    try:
        save_train_state(os.path.join(tmp, TRAIN_DIR), model, optimizer, ctx)
        if reference is not None:
            with reference() as module:
                if module is not None:
                    dcp(save, get_model_state_dict(module), ctx,
                        storage_writer=FileSystemWriter(os.path.join(tmp, REFERENCE_DIR), sync_files=True))
        rng = all_ranks([{"torch": torch.get_rng_state(), "python": random.getstate(),
                          # this process's device only: another machine may see another number of GPUs
                          "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}], ctx)
        on_main(lambda: write_state({**loop_state, "rng": rng}, tmp), ctx)
        write_manifest(tmp, ctx, step=step, world_size=ctx.world_size, tp_size=ctx.tp_size)
    except BaseException as exc:   # DCP's CheckpointException is a BaseException
        if not _disk_full(exc):
            raise
        if ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)   # frees what it took; never a checkpoint
        intact = list_checkpoints(root)
        raise CheckpointNotWritten(
            f"disk full while saving checkpoint {step} to {final}; "
            + (f"the previous checkpoint, {intact[-1]}, is intact" if intact else "no checkpoint had been written "
               "before it") + f"; free space and rerun with {option('resume')}") from None
    on_main(lambda: (replace_directory(tmp, final), prune(root, keep=keep, newest=final)), ctx)
    return final


def _disk_full(exc):
    """Whether `exc`, its cause, or a rank's failure that DCP collected in it is ENOSPC (or EDQUOT)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    failures = [failure[0] for failure in exc.failures.values()] if isinstance(exc, CheckpointException) else []
    return any(_disk_full(e) for e in (exc.__cause__, exc.__context__, *failures) if e is not None)


def prune(root, *, keep, newest):
    """Deletes all but `keep` checkpoints: `newest` (just written) and the keep - 1 latest others."""
    others = [path for path in list_checkpoints(root) if os.path.abspath(path) != os.path.abspath(newest)]
    for old in others[:max(0, len(others) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)


# ---- loading -------------------------------------------------------------------------------------------
def checkpoint_problem(path, ctx):
    """None if this rank's share of checkpoint `path`'s files is intact, else what is wrong. A checkpoint
    of an older layout is intact but unreadable: refused (UsageError), never moved aside as corrupt."""
    manifest, problem = read_manifest(path)
    if problem is not None:
        return problem
    listed = set(manifest["files"])
    if "shared.pt" in listed and PICKLED_LOOP_FILE not in listed:
        raise UsageError(f"{option('resume')}: {path} was written by an older spin_trainer (rank*.pt files, no "
                         f"torch.distributed.checkpoint); this version cannot resume it: finish that run with "
                         f"the version that wrote it, or start a new one in another {option('out')}")
    if PICKLED_LOOP_FILE in listed and STRUCTURE_FILE not in listed:
        raise UsageError(f"{option('resume')}: {path} keeps its loop state in {PICKLED_LOOP_FILE}, a pickle of an "
                         f"older spin_trainer; this version does not read pickles (they can run code); finish "
                         f"that run with the version that wrote it, or start a new one in another {option('out')}")
    return files_problem(path, manifest, (STRUCTURE_FILE, TENSORS_FILE), ctx)


def move_aside(path):
    """step-N -> step-N.corrupt (or .corrupt-2, ...): kept for inspection, out of the rotation."""
    target, n = path + CORRUPT_SUFFIX, 1
    while os.path.exists(target):
        n += 1
        target = f"{path}{CORRUPT_SUFFIX}-{n}"
    os.rename(path, target)
    return target


def find_latest_checkpoint(root, ctx, report=print):
    """The newest intact Checkpoint under `root` (all ranks call this). Corrupt ones are reported
    (once, by rank 0) and moved aside; with none intact, --resume is refused, naming each one found
    and what is wrong with it: starting over is the user's choice, never a fallback."""
    moved = {}   # the names corrupt checkpoints were moved aside to: what was wrong with each
    for path in reversed(list_checkpoints(root)):
        problem = checkpoint_problem(path, ctx)
        if problem is None:
            try:
                loop_state = read_state(path)
            except Exception as exc:  # any failure to read it means the same thing: unusable
                problem = f"{STRUCTURE_FILE} cannot be loaded ({type(exc).__name__}: {exc})"
        problems = [p for p in all_ranks([problem], ctx) if p is not None]
        if not problems:
            return Checkpoint(path, loop_state)
        if ctx.is_main:   # every rank has read it: all_ranks waited for each
            target = move_aside(path)
            report(f"warning: checkpoint {path} is corrupt or incomplete: {problems[0]}; moved aside to {target}")
            name = os.path.basename(target)
            moved[name] = f"{os.path.basename(path)}: {problems[0]} (moved aside to {name})"
        ctx.barrier()
    earlier = sorted(n for n in os.listdir(root) if CORRUPT_SUFFIX in n) if os.path.isdir(root) else []
    found = [*moved.values()] + [f"{n}: moved aside as corrupt by an earlier run" for n in earlier if n not in moved]
    raise UsageError(f"{option('resume')}: no usable checkpoint under {root} (found: {'; '.join(found) or 'none'}); "
                     f"nothing was trained. To start the run over, run without {option('resume')} (its metrics "
                     f"are replaced), or use another {option('out')}")


def shapes(directory, prefix, module):
    """{name: shape as a list} of the tensors DCP `directory` holds under `prefix` (cut off the names),
    and of `module`'s state dict."""
    metadata = FileSystemReader(directory).read_metadata().state_dict_metadata
    return ({key[len(prefix):]: list(meta.size) for key, meta in metadata.items()
             if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)},
            {name: list(tensor.shape) for name, tensor in get_model_state_dict(module).items()})


def check_fits(directory, module, what):
    """UsageError naming the first tensor that cannot be loaded into `module` from DCP `directory`."""
    saved, here = shapes(directory, "model." if what == "model" else "", module)
    missing, unexpected = sorted(set(here) - set(saved)), sorted(set(saved) - set(here))
    again = f"resume with the {option('model')} it was written with"
    if missing or unexpected:
        raise UsageError(f"{option('resume')}: {directory} holds another model's {what} weights: {len(missing)} "
                         f"tensor(s) of this model are not in it (e.g. {missing[:3]}), {len(unexpected)} of its "
                         f"tensor(s) are not in this model (e.g. {unexpected[:3]}); {again}")
    for name, shape in here.items():
        if saved[name] != shape:
            hint = (f" (another vocabulary: another tokenizer or {option('model')}?)"
                    if ("embed" in name or "lm_head" in name) and saved[name][1:] == shape[1:] else "")
            raise UsageError(f"{option('resume')}: {directory} cannot be loaded into this model: {what} tensor "
                             f"{name} has shape {saved[name]} there and {shape} here{hint}; {again}")


def load_checkpoint(checkpoint, *, model, optimizer, reference, ctx):
    """Loads the tensors of `checkpoint` (resharded to this run); `reference()` is a context manager
    yielding the module to load θ_t into (called only when the checkpoint holds θ_t)."""
    train_dir, reference_dir = (os.path.join(checkpoint.path, name) for name in (TRAIN_DIR, REFERENCE_DIR))
    check_fits(train_dir, model, "model")
    load_train_state(train_dir, model, optimizer, ctx)
    if os.path.isdir(reference_dir):
        with reference() as module:
            assert module is not None, "the checkpoint holds θ_t but this reference mode keeps no weights"
            check_fits(reference_dir, module, "reference")
            load_weights(module, reference_dir, ctx)


def restore_rng(states, ctx):
    """This rank's saved RNG states (rank r mod N when the world size changed)."""
    state = states[ctx.rank % len(states)]
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def check_finite_weights(model, ctx, step, last_checkpoint):
    """A non-finite update must never reach a checkpoint (or the export): stop with a true message.
    `last_checkpoint`: (step, path) of the newest one written, or None."""
    finite = torch.stack([torch.isfinite(local_tensor(w)).all() for w in model.parameters()]).all()
    if not all(all_ranks([bool(finite)], ctx)):
        newest = (f"the newest checkpoint, {last_checkpoint[1]} (step {last_checkpoint[0]}), is intact"
                  if last_checkpoint is not None else "no checkpoint had been written yet")
        raise TrainingDiverged(f"training diverged: after step {step} the weights hold non-finite values (NaN or "
                               f"inf), so no checkpoint was written for it; {newest}. Lower the learning rate "
                               f"(float16 has no loss scaling here: use bfloat16 or float32)")
