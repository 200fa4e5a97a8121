"""`spin-train export CHECKPOINT_DIR OUT_DIR [--dtype D] [--model DIR]`: a run's checkpoint as a
Hugging Face model directory.

One process reads a checkpoint written by any number of processes and any --tp: DCP reshards its
model tensors into a plain module (the optimizer state is not read). The architecture, config,
generation config and tokenizer are the run's --model, read from its OUT/config.yaml (the checkpoint
is OUT/checkpoints/spin/step-N), or given with --model. The model is built in the export dtype, so
the process holds one copy of the weights in that dtype.
"""
import argparse
import os
from contextlib import suppress

import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from .checkpoint import TRAIN_DIR, checkpoint_problem, load_weights, shapes
from .config import DTYPES
from .errors import UsageError
from .export import export_hf, resolve_export_dtype
from .model import check_model_dir, load_tokenizer, read_model_config
from .options import read_saved_options
from .parallel.mesh import ParallelContext

ONE_PROCESS = ParallelContext(0, 1, 1, 1, 0, 0, torch.device("cpu"))


def run_model_dir(checkpoint):
    """The --model of the run that wrote `checkpoint` (OUT/checkpoints/spin/step-N), or None."""
    config_path = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(checkpoint))), "config.yaml")
    return read_saved_options(config_path).get("model") if os.path.isfile(config_path) else None


def check_fits(directory, model, model_dir):
    """The checkpoint holds exactly this model's tensors, in its shapes."""
    saved, here = shapes(directory, "model.", model)
    for name in sorted(set(saved) | set(here)):
        if saved.get(name) != here.get(name):
            raise UsageError(f"{directory} does not hold the weights of the model in {model_dir!r}: tensor {name} "
                             f"has shape {saved.get(name)} there and {here.get(name)} in that model (None: absent); "
                             f"pass --model with the model the run was trained from")


def export_checkpoint(checkpoint, out, *, dtype="auto", model_dir=None):
    """Writes checkpoint `checkpoint`'s model to `out` in Hugging Face format; returns `out`."""
    if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)):
        # A user's directory (a run's OUT, the demo's, another model) would be replaced whole.
        raise UsageError(f"OUT_DIR {out!r} already exists and is not empty; the export writes a new directory: "
                         f"choose another path, or remove that one first")
    checkpoint = os.path.abspath(checkpoint)
    directory = os.path.join(checkpoint, TRAIN_DIR)
    if not os.path.isdir(directory):
        raise UsageError(f"{checkpoint!r}: not a checkpoint directory (expected OUT/checkpoints/spin/step-N, "
                         f"holding {TRAIN_DIR}/)")
    problem = checkpoint_problem(checkpoint, ONE_PROCESS)
    if problem is not None:
        raise UsageError(f"{checkpoint!r}: the checkpoint is corrupt or incomplete: {problem}")
    model_dir = model_dir or run_model_dir(checkpoint)
    if model_dir is None:
        raise UsageError(f"{checkpoint!r}: the run's config.yaml (three levels up) was not found; pass --model "
                         f"with the model directory the run was trained from")
    check_model_dir(model_dir)
    config = read_model_config(model_dir)   # trust_remote_code=False: a checkpoint's model runs no shipped code
    export_dtype = resolve_export_dtype(dtype, config, name="dtype")
    model = AutoModelForCausalLM.from_config(config, dtype=export_dtype)
    with suppress(OSError):   # the model has no generation_config.json: keep the one derived from its config
        model.generation_config = GenerationConfig.from_pretrained(model_dir)
    check_fits(directory, model, model_dir)
    load_weights(model, directory, ONE_PROCESS, key="model")   # converted to the export dtype as it is copied in
    return export_hf(model, load_tokenizer(model_dir), out, ONE_PROCESS, dtype=export_dtype)


def main(argv):
    parser = argparse.ArgumentParser(prog="spin-train export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", metavar="CHECKPOINT_DIR", help="a checkpoint: OUT/checkpoints/spin/step-N")
    parser.add_argument("out", metavar="OUT_DIR", help="the Hugging Face directory to write (new, or empty)")
    parser.add_argument("--dtype", choices=("auto",) + DTYPES, default="auto",
                        help="dtype of the exported weights; auto: the model's config.torch_dtype (default: auto)")
    parser.add_argument("--model", help="the model directory the run was trained from (default: the run's "
                                        "--model, from OUT/config.yaml)")
    args = parser.parse_args(argv)
    out = export_checkpoint(args.checkpoint, args.out, dtype=args.dtype, model_dir=args.model)
    print(f"exported {args.checkpoint} to {out}")
    return out
