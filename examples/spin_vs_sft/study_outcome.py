"""Where does SPIN beat continued SFT? A CPU study through the trainer's own code (spin_trainer).

    python examples/spin_vs_sft/study_outcome.py     # the full study (table: benchmarks/results/outcome.md)
    python examples/spin_vs_sft/study_outcome.py --tasks arith --seeds 0 --starts warmup --spin-lrs 3e-5 \
        --betas 0.5 --sft-lrs 1e-3 --iterations 3 --spin-prompts 64 --out /tmp/o.md     # the CI size

For each task (built-in, exactly checkable answers) and seed: a fresh tiny model, one SFT run that
gives both starts (the short warm-up; and SFT to convergence by early stopping on the validation
loss with patience, best weights kept), then from each start both arms for every point of their
grid (continued SFT: lr; SPIN: lr x β), with equal optimizer steps and examples seen. Each arm's
grid point is chosen per seed by the final validation exact match (ties: lower validation loss),
never by the test split; the test exact match of the chosen point is what the table reports,
as mean ± standard error over the seeds, and the verdict is verdict.py's paired t interval. Every
part is a function of the seed. (task, seed) units run in parallel processes.
"""
import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time

from spin_trainer.errors import UsageError

from comparison import TASKS, Arm, Protocol, make_starts, metrics_log, prepare, run_arm
from outcome_report import report_markdown
from workers import run_script, run_units, unit_context

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
# The report lies with the benchmarks' results and is written as they are (benchmarks/results_file.py).
sys.path.insert(1, os.path.join(ROOT, "benchmarks"))
from results_file import write_results  # noqa: E402

DEFAULT_OUT = os.path.join(ROOT, "benchmarks", "results", "outcome.md")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--tasks", nargs="+", default=["arith", "sort"])
    add("--starts", nargs="+", default=["warmup", "converged"])
    add("--seeds", nargs="+", type=int, default=[0, 1, 2])
    add("--sft-lrs", nargs="+", type=float, default=[1e-4, 3e-4, 1e-3, 3e-3])
    # A first run with lr up to 3e-4 and β up to 8 chose those edges on the validation split from the
    # warm-up starts; the grid reaches one step further on both.
    add("--spin-lrs", nargs="+", type=float, default=[3e-5, 1e-4, 3e-4, 1e-3])
    add("--betas", nargs="+", type=float, default=[0.5, 2.0, 8.0, 32.0])
    add("--iterations", type=int, default=4, help="SPIN iterations (continued SFT: the same steps)")
    add("--spin-prompts", type=int, default=1024, help="training prompts both arms use")
    add("--patience", type=int, default=10, help="validation checks without improvement before the start stops")
    add("--eval-every", type=int, default=100, help="SFT steps between the start's validation checks")
    add("--max-start-steps", type=int, default=10_000)
    add("--workers", type=int, default=2, help="(task, seed) units run at once, one CPU thread each")
    add("--out", default=DEFAULT_OUT, help="markdown report (raw numbers beside it, .json)")
    add("--work", default=None, help="scratch directory (default: one beside --out, removed at the end)")
    add("--from-json", default=None, help="only rewrite the report from the raw results of an earlier study")
    return parser


def code_version():
    """The commit the study ran (with "+changes" if the tree differed from it), or None outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+changes" if dirty else "")


def grid(args):
    return ([Arm("sft", lr) for lr in args.sft_lrs] +
            [Arm("spin", lr, beta) for lr in args.spin_lrs for beta in args.betas])


def protocol(args):
    return Protocol(patience=args.patience, eval_every=args.eval_every, max_start_steps=args.max_start_steps,
                    spin_prompts=args.spin_prompts, iterations=args.iterations)


KEPT = ("iteration", "step", "exact_match", "val_exact_match", "val_sft_loss", "spin_acc_start", "spin_acc_end",
        "margin_start", "margin_end", "gen_equals_gold", "val_spin_acc")


def run_unit(task_name, seed, args, work):
    """Both starts and every grid point of both arms for one (task, seed); plain-data results."""
    began, cpu_began = time.time(), time.process_time()
    out_dir = os.path.join(work, f"{task_name}-seed{seed}")
    shutil.rmtree(out_dir, ignore_errors=True)
    with unit_context() as ctx:
        setup = prepare(TASKS[task_name], seed, out_dir, ctx, val_exact_match=True)
        proto = protocol(args)
        starts = make_starts(setup, proto, args.starts, metrics_log(os.path.join(out_dir, "start.jsonl")))
        result = {"task": task_name, "seed": seed, "starts": {}}
        for kind, start in starts.items():
            runs = []
            for arm in grid(args):
                run_dir = os.path.join(out_dir, kind)
                rows = run_arm(setup, start, arm, proto, metrics_log(os.path.join(run_dir, f"{arm.label}.jsonl")),
                               run=arm.kind, out_dir=run_dir)
                shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)
                runs.append({"arm": arm.kind, "lr": arm.lr, "beta": arm.beta,
                             "rows": [{k: r.get(k) for k in KEPT} for r in rows]})
            result["starts"][kind] = {"step": start.step, "stopped_at": start.stopped_at,
                                      "exact_match": start.row["exact_match"],
                                      "val_sft_loss": start.row["val_sft_loss"], "runs": runs}
        result["seconds"], result["cpu_seconds"] = time.time() - began, time.process_time() - cpu_began
        return result


def main(argv=None):
    args = build_parser().parse_args(argv)
    prefix = os.path.splitext(args.out)[0]   # the report <prefix>.md, its raw numbers <prefix>.json
    if args.from_json:
        with open(args.from_json, encoding="utf-8") as f:
            saved = json.load(f)
        write_results(prefix, saved, report_markdown(saved["results"], saved["meta"]), compact=True)
        print(f"wrote {prefix}.md and .json from {args.from_json}")
        return
    unknown = [t for t in args.tasks if t not in TASKS]
    if unknown:
        raise UsageError(f"--tasks: unknown {unknown}; built-in tasks are {sorted(TASKS)}")
    words = sys.argv[1:] if argv is None else argv
    command = f"python {os.path.relpath(os.path.abspath(__file__), ROOT)}" + "".join(" " + shlex.quote(a) for a in words)
    load_before = os.getloadavg()
    began = time.time()
    work = args.work or os.path.join(os.path.dirname(os.path.abspath(args.out)), ".outcome-work")
    units = [(task, seed, args, work) for task in args.tasks for seed in args.seeds]
    results = list(run_units(run_unit, units, args.workers))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    seconds = time.time() - began
    meta = {"command": command, "seconds": seconds, "load_before": load_before, "load_after": os.getloadavg(),
            "cpus": os.cpu_count(), "workers": args.workers, "python": platform.python_version(),
            "code": code_version(),
            "protocol": vars(protocol(args)), "grid": [vars(a) for a in grid(args)]}
    # The raw numbers are written first: a report can always be rewritten from them (--from-json).
    write_results(prefix, {"meta": meta, "results": results}, report_markdown(results, meta), compact=True)
    print(f"wrote {prefix}.md and .json ({seconds / 60:.1f} min)")


if __name__ == "__main__":
    run_script(main)
