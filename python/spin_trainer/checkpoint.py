"""Checkpoints and the final Hugging Face export, never half-written.

A checkpoint is a directory `step-00000042/` holding one `rank00000.pt` per process (this rank's
local shards of policy, reference and optimizer, and its RNG states), `shared.pt` (loop position,
scheduler, cached generations and reference log-probs) and `manifest.json` (sizes and SHA-256 of
every file). It is written into a temporary directory, fsynced, and renamed into place only when
complete; the last `keep` are kept. On load, a checkpoint whose manifest is missing or does not
match its files, or that fails to load, is reported and the previous one is used.
"""
import hashlib
import json
import os
import shutil

import torch
import torch.distributed as dist
from spin_kernels.dtensor import is_dtensor, local_tensor

PREFIX = "step-"
MANIFEST = "manifest.json"


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path):
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _save(obj, path):
    torch.save(obj, path)
    _fsync(path)


def rank_file(rank):
    return f"rank{rank:05d}.pt"


def list_checkpoints(root):
    """Complete-looking checkpoint directories under `root`, oldest first."""
    if not os.path.isdir(root):
        return []
    names = [n for n in os.listdir(root) if n.startswith(PREFIX) and n[len(PREFIX):].isdigit()]
    return [os.path.join(root, n) for n in sorted(names, key=lambda n: int(n[len(PREFIX):]))]


def save_checkpoint(root, step, rank_state, shared_state, ctx, *, keep):
    """Writes checkpoint `step` atomically (all ranks call this); returns its path."""
    final = os.path.join(root, f"{PREFIX}{step:08d}")
    tmp = os.path.join(root, f".tmp-{PREFIX}{step:08d}")
    if ctx.is_main:
        os.makedirs(root, exist_ok=True)
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
    ctx.barrier()
    _save(rank_state, os.path.join(tmp, rank_file(ctx.rank)))
    if ctx.is_main:
        _save(shared_state, os.path.join(tmp, "shared.pt"))
    ctx.barrier()
    if ctx.is_main:
        files = sorted(os.listdir(tmp))
        manifest = {"step": step, "world_size": ctx.world_size, "tp_size": ctx.tp_size,
                    "files": {n: {"bytes": os.path.getsize(os.path.join(tmp, n)),
                                  "sha256": _sha256(os.path.join(tmp, n))} for n in files}}
        with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        replace_directory(tmp, final)
        for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    ctx.barrier()
    return final


def replace_directory(new, final):
    """Renames `new` to `final`; an existing `final` stays intact until the new one is in place."""
    previous = None
    if os.path.exists(final):
        previous = f"{final}.previous-{os.getpid()}"
        os.rename(final, previous)
    os.rename(new, final)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)


def checkpoint_problem(path, ctx):
    """None if this rank's files of checkpoint `path` are intact, else what is wrong."""
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        return "manifest.json is missing (half-written)"
    try:
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as exc:
        return f"manifest.json is unreadable ({exc})"
    if manifest.get("world_size") != ctx.world_size or manifest.get("tp_size") != ctx.tp_size:
        # Not corrupt, only sharded another way: refuse rather than fall back and start over
        # (which, with --keep, would end by deleting the run's progress).
        raise ValueError(f"--resume: checkpoint {path} was written by {manifest.get('world_size')} processes "
                         f"with --tp {manifest.get('tp_size')}, this run has {ctx.world_size} with --tp "
                         f"{ctx.tp_size}; resume with the same torchrun --nproc_per_node and --tp")
    for name in (rank_file(ctx.rank), "shared.pt"):
        full = os.path.join(path, name)
        if name not in files or not os.path.isfile(full):
            return f"{name} is missing"
        if os.path.getsize(full) != files[name]["bytes"]:
            return f"{name} has {os.path.getsize(full)} bytes, the manifest says {files[name]['bytes']}"
        if _sha256(full) != files[name]["sha256"]:
            return f"{name} does not match its SHA-256 in the manifest"
    return None


def _agree(problem, ctx):
    """True on every rank if any rank found a problem (all ranks must fall back together)."""
    if ctx.world_size == 1:
        return problem is not None
    flag = torch.tensor([1 if problem is not None else 0], device=ctx.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def load_latest_checkpoint(root, ctx, report=print):
    """(path, rank_state, shared_state) of the newest intact checkpoint, or None if there is none."""
    for path in reversed(list_checkpoints(root)):
        problem = checkpoint_problem(path, ctx)
        rank_state = shared_state = None
        if problem is None:
            try:
                # Our own files (RNG states and Python lists inside), hence weights_only=False.
                rank_state = torch.load(os.path.join(path, rank_file(ctx.rank)), map_location="cpu",
                                        weights_only=False)
                shared_state = torch.load(os.path.join(path, "shared.pt"), map_location="cpu", weights_only=False)
            except Exception as exc:  # any unpickling failure means the same thing: unusable
                problem = f"it cannot be loaded ({type(exc).__name__}: {exc})"
        if _agree(problem, ctx):
            if ctx.is_main or problem is not None:
                report(f"warning: checkpoint {path} is corrupt or incomplete: {problem or 'another rank failed'}; "
                       f"falling back to the previous checkpoint")
            continue
        return path, rank_state, shared_state
    return None


def full_state_dict(model):
    """CPU state dict with every DTensor gathered to its full tensor (a collective: all ranks call it)."""
    state = {}
    for name, tensor in model.state_dict().items():
        if hasattr(tensor, "full_tensor"):
            tensor = tensor.full_tensor()
        state[name] = tensor.detach().to("cpu", copy=True)
    return state


def export_hf(model, tokenizer, out_dir, ctx):
    """Saves the full model + tokenizer to `out_dir` in HF format, atomically (all ranks call it)."""
    state = full_state_dict(model)
    if ctx.is_main:
        parent = os.path.dirname(os.path.abspath(out_dir))
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".tmp-export-{os.path.basename(out_dir)}")
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        model.save_pretrained(tmp, state_dict=state)
        tokenizer.save_pretrained(tmp)
        for name in os.listdir(tmp):
            _fsync(os.path.join(tmp, name))
        replace_directory(tmp, out_dir)
    ctx.barrier()
    return out_dir


def local_state(module):
    """{name: CPU copy of this rank's shard} of a module's parameters and buffers."""

    with torch.no_grad():
        return {name: local_tensor(t).detach().to("cpu", copy=True) for name, t in module.state_dict().items()}


def load_local_state(module, state, what="policy"):
    """Copies `state` (from local_state) into the module's existing tensors, in place."""

    current = module.state_dict()
    if set(current) != set(state):
        missing, extra = sorted(set(current) - set(state)), sorted(set(state) - set(current))
        raise ValueError(f"checkpoint {what} weights do not match the model: missing {missing[:5]}, "
                         f"unexpected {extra[:5]} (was it written for another --model?)")
    with torch.no_grad():
        for name, tensor in current.items():
            target = local_tensor(tensor)
            if target.shape != state[name].shape:
                raise ValueError(f"checkpoint {what} tensor {name} has shape {tuple(state[name].shape)}, "
                                 f"the model's is {tuple(target.shape)}")
            target.copy_(state[name])


def optimizer_local_state(optimizer):
    """optimizer.state_dict() with DTensor states replaced by CPU copies of the local shards."""

    state_dict = optimizer.state_dict()
    state_dict["state"] = {
        index: {k: (local_tensor(v).detach().to("cpu", copy=True) if torch.is_tensor(v) else v)
                for k, v in param_state.items()}
        for index, param_state in state_dict["state"].items()}
    return state_dict


def load_optimizer_local_state(optimizer, state_dict):
    """Inverse of optimizer_local_state: loads, then re-wraps states of DTensor parameters."""
    optimizer.load_state_dict(state_dict)
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not is_dtensor(p):
                continue
            from torch.distributed.tensor import DTensor

            param_state = optimizer.state.get(p, {})
            for k, v in list(param_state.items()):
                if torch.is_tensor(v) and not isinstance(v, DTensor) and v.dim() > 0:
                    param_state[k] = DTensor.from_local(v.to(p.device), p.device_mesh, p.placements,
                                                        run_check=False)
