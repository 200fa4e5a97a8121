"""How the demo (demo.py) and the study (study_outcome.py) run: their units (a seed, or a task x
seed) each in a spawned process of its own, one CPU thread each, results in the order of the calls;
and the script itself, whose mistakes of use end it as spin-train's do."""
import concurrent.futures
import multiprocessing
import sys
from contextlib import contextmanager

import torch

from spin_trainer.errors import UsageError
from spin_trainer.parallel.mesh import setup_parallel, teardown_parallel


def run_script(main):
    """Runs `main()`; a UsageError ends the process with its message alone and status 2."""
    try:
        main()
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


@contextmanager
def unit_context():
    """The 1-process ParallelContext of one unit, with no loading bars (a unit loads its tiny model
    several times) and one intra-op thread: for a tiny model more threads only add OpenMP
    synchronisation, and on a busy machine spin-waiting that slows each small matmul ~100x."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)
    ctx = setup_parallel(1, "cpu")
    try:
        yield ctx
    finally:
        teardown_parallel(ctx)


def run_units(fn, calls, workers):
    """Yields fn(*call) for each call, in order: in `workers` spawned processes when more than one
    (each unit builds its own model and writes its own directory), else in this process."""
    if workers <= 1 or len(calls) <= 1:
        for call in calls:
            yield fn(*call)
        return
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for future in [pool.submit(fn, *call) for call in calls]:
            yield future.result()
