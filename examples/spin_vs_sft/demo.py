"""SPIN against continued SFT on a built-in task, over 3 seeds, in under a minute on 2 CPU cores (`make demo`).

    python examples/spin_vs_sft/demo.py --out runs/demo [--seed S] [--attn sdpa] [--no-progress]

It runs one setting of study_outcome.py (see DEMO below, benchmarks/results/outcome.md and the
README): its task, its start, and each arm's learning rate (and β) as the study chose them on the
validation split. Per seed: a fresh tiny Llama and character tokenizer (saved in HF format, no
download), the SFT start, then SPIN and, from the same start with the same optimizer steps and
examples seen, continued SFT; the seeds run in parallel processes. It prints each arm's
per-iteration table (mean ± standard error over the seeds) with the iteration diagnostics, and a
verdict that takes the seed-to-seed noise into account; it writes curves.png.

--out must be empty, absent, or hold only an earlier demo (which is replaced): the demo never
writes over a training run. --seed S runs seeds S, S + 1, S + 2. It runs as one process (its seeds
are worker processes of its own): not under torchrun.
"""
import argparse
import json
import os
import re
import shutil
import sys
import textwrap
import time
from dataclasses import dataclass

from spin_trainer.config import ATTENTION
from spin_trainer.errors import UsageError
from spin_trainer.export import export_hf
from spin_trainer.metrics import read_records
from spin_trainer.plots import TABLE_LEGEND, format_table

from comparison import START_NAMES, TASKS, Arm, Protocol, Task, make_starts, metrics_log, prepare, run_arm
from seeds import mean_rows, plot_curves
from verdict import verdict
from workers import run_script, run_units, unit_context


@dataclass(frozen=True)
class Setting:
    task: Task
    start: str
    spin: Arm
    sft: Arm
    protocol: Protocol
    seeds: int

    def summary(self, seeds):
        return {"task": self.task.name, "start": self.start, "seeds": seeds, "spin": vars(self.spin),
                "sft": vars(self.sft), "protocol": vars(self.protocol)}


# SPIN beat continued SFT in no setting of the study (benchmarks/results/outcome.md). The demo runs
# the one with the largest difference and whose diagnostics say the most: sort from the short
# warm-up, where SPIN learns (its own answers get right more often, margins grow) but continued SFT
# learns faster. The learning rates and β are the study's grid points with the best validation
# exact match on average over its seeds.
DEMO = Setting(task=TASKS["sort"], start="warmup", spin=Arm("spin", lr=1e-4, beta=2.0), sft=Arm("sft", lr=1e-3),
               protocol=Protocol(), seeds=3)

WIDTH = 100   # of the text around the tables, for a terminal and a log file alike
MARKER = "demo.json"
DEMO_ENTRY = re.compile(r"(demo\.json|curves\.png)(\.tmp.*)?|seed-\d+")
# What the one-seed demo before demo.json wrote; its metrics.jsonl starts with its warm-up's records.
SINGLE_SEED_DEMO = {"base_model", "checkpoints", "curves.png", "final", "metrics.jsonl"}


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory: absent, empty or an earlier demo's")
    parser.add_argument("--seed", type=int, default=0, help="the first of the 3 seeds (default: 0)")
    parser.add_argument("--attn", default="auto", choices=ATTENTION, help="attention kernel (default: auto)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars (bars show only on a terminal, and with one worker, anyway)")
    return parser


def check_single_process():
    """Under torchrun every rank would run the whole demo into the same --out."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("the demo runs as one process and starts its own worker processes, one per seed; "
                         "run it without torchrun: python examples/spin_vs_sft/demo.py --out DIR")


def check_demo_out(out):
    """Refuses an --out that holds anything but an earlier demo (the demo replaces its directory)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out!r} is a file; the demo needs a directory")
    if not os.path.isdir(out):
        return
    entries = sorted(os.listdir(out))
    if not entries or (MARKER in entries and all(DEMO_ENTRY.fullmatch(e) for e in entries)):
        return
    if is_single_seed_demo(out, entries):
        return
    foreign = [e for e in entries if not DEMO_ENTRY.fullmatch(e)] if MARKER in entries else entries
    shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
    raise UsageError(f"--out {out!r} already holds files that are not an earlier demo's ({shown}); the demo "
                     f"replaces its output directory, so it refuses to run there: choose another --out")


def is_single_seed_demo(out, entries):
    if not set(entries) <= SINGLE_SEED_DEMO or "metrics.jsonl" not in entries:
        return False
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8", errors="replace") as f:
        first = f.readline()
    try:
        return json.loads(first).get("run") == "sft_warmup"
    except (json.JSONDecodeError, AttributeError):
        return False


def reset_demo_out(out, settings):
    """Removes an earlier demo's files and marks `out` as the demo's (before anything else is written)."""
    os.makedirs(out, exist_ok=True)
    for entry in os.listdir(out):
        path = os.path.join(out, entry)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif entry != MARKER:
            os.remove(path)
    write_json(os.path.join(out, MARKER), settings)


def write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def run_seed(setting, seed, out, attention, progress):
    """One seed of the demo, in this process or a worker: (SPIN rows, SFT rows, metrics path, summary line)."""
    began = time.time()
    seed_dir = os.path.join(out, f"seed-{seed}")
    with unit_context() as ctx:
        setup = prepare(setting.task, seed, seed_dir, ctx, attention=attention, progress=progress)
        metrics = metrics_log(os.path.join(seed_dir, "metrics.jsonl"))
        start = make_starts(setup, setting.protocol, [setting.start], metrics)[setting.start]
        spin_rows = run_arm(setup, start, setting.spin, setting.protocol, metrics)
        export_hf(setup.model, setup.tokenizer, os.path.join(seed_dir, "final"), ctx)
        sft_rows = run_arm(setup, start, setting.sft, setting.protocol, metrics)
    line = (f"seed {seed}: start after {start.step} SFT steps, test exact match {start.row['exact_match']:.3f}; "
            f"after {spin_rows[-1]['step']} more steps: SPIN {spin_rows[-1]['exact_match']:.3f}, continued SFT "
            f"{sft_rows[-1]['exact_match']:.3f} ({time.time() - began:.0f} s)")
    return spin_rows, sft_rows, metrics.path, line


def run_seeds(setting, seeds, out, attention, progress):
    """Every seed's results, in seed order; seeds run in parallel processes, one per CPU core."""
    workers = min(len(seeds), os.cpu_count() or 1)
    progress = progress and workers == 1   # bars of parallel workers would overwrite each other
    results = []
    for result in run_units(run_seed, [(setting, seed, out, attention, progress) for seed in seeds], workers):
        results.append(result)
        print(result[-1], flush=True)
    return results


def run_demo(args):
    began = time.time()
    check_single_process()
    check_demo_out(args.out)
    setting = DEMO
    progress = not args.no_progress and sys.stderr.isatty()   # in a log file each redraw is a line
    seeds = [args.seed + k for k in range(setting.seeds)]
    out = args.out
    reset_demo_out(out, setting.summary(seeds))
    print(textwrap.fill(f"SPIN vs continued SFT on the '{setting.task.name}' task from the "
                        f"{START_NAMES[setting.start]}, seeds {seeds}: SPIN lr {setting.spin.lr:g} β "
                        f"{setting.spin.beta:g}, continued SFT lr {setting.sft.lr:g} (chosen by "
                        f"examples/spin_vs_sft/study_outcome.py on the validation split)", WIDTH), flush=True)
    spin_by_seed, sft_by_seed, paths, _ = zip(*run_seeds(setting, seeds, out, args.attn, progress))
    num_test = setting.task.test_size()
    steps = spin_by_seed[0][-1]["step"]
    print()
    print(format_table(mean_rows(spin_by_seed), f"SPIN, {setting.protocol.iterations} iterations from the start "
                                                f"(iteration 0), mean over {len(seeds)} seeds"))
    print()
    print(format_table(mean_rows(sft_by_seed), "Continued SFT from the same start: the same optimizer steps, "
                                               "batch size and examples seen"))
    print(textwrap.fill(TABLE_LEGEND, WIDTH))
    print()
    winner, text = verdict([rows[-1]["exact_match"] for rows in spin_by_seed],
                           [rows[-1]["exact_match"] for rows in sft_by_seed], num_test=num_test, steps=steps)
    print(textwrap.fill(text, WIDTH))
    curves = plot_curves([read_records(p) for p in paths], os.path.join(out, "curves.png"),
                         ["sft_start", "sft", "spin"])
    write_json(os.path.join(out, MARKER), {**setting.summary(seeds), "winner": winner, "verdict": text,
                                           "spin_final": [r[-1]["exact_match"] for r in spin_by_seed],
                                           "sft_final": [r[-1]["exact_match"] for r in sft_by_seed]})
    print(f"wrote {curves}, per seed {os.path.join(out, 'seed-N')}/metrics.jsonl and the SPIN model "
          f"{os.path.join(out, 'seed-N', 'final')} ({time.time() - began:.0f} s)")
    return spin_by_seed, sft_by_seed


def main(argv=None):
    return run_demo(build_parser().parse_args(argv))


if __name__ == "__main__":
    run_script(main)
