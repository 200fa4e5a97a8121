"""SPIN against continued SFT from the same start, on a built-in task: the code demo.py and
study_outcome.py share. Every model update goes through run_sft (sft.py) and spin_trainer's
SpinTrainer, the code a user's run takes.

- A task: committed data (data/<name>/{train,val,test}.jsonl at the repository's root, written by
  data/make_<name>.py), its context length and answer length. A fresh tiny Llama and its
  character tokenizer per seed.
- A start: SFT of the fresh model at a constant learning rate. "warmup" stops after the task's
  short warm-up (a weak model); "converged" runs on until the validation loss has not improved
  for `patience` evaluations and keeps the best weights. Both come from one SFT run per seed: the
  warm-up is its first steps.
- Two arms from a start, each with its own learning rate: "spin" (SpinTrainer: `iterations`
  iterations of one epoch over the SPIN prompts) and "sft" (run_sft on the same prompts' gold
  responses for the same number of optimizer steps at the same batch size: the same examples seen).
"""
import os
from dataclasses import dataclass

from spin_trainer.config import RunConfig
from spin_trainer.data import load_examples
from spin_trainer.errors import UsageError
from spin_trainer.evaluate import HeldOut
from spin_trainer.export import full_state_dict
from spin_trainer.generation.sampling import SamplingConfig
from spin_trainer.logprobs import Scorer
from spin_trainer.metrics import MetricsLog
from spin_trainer.model import create_default_model, load_model, load_tokenizer
from spin_trainer.packed_scoring import choose_packing
from spin_trainer.parallel.precision import Precision
from spin_trainer.trainer import SpinTrainer

from sft import EarlyStopping, run_sft

# examples/spin_vs_sft/../../data: the tasks are the repository's, not the installed package's.
DATA_ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir, "data"))
START_KINDS = ("warmup", "converged")
START_NAMES = {"warmup": "short warm-up", "converged": "SFT converged (early stopping)"}
ARM_KINDS = ("spin", "sft")


@dataclass(frozen=True)
class Task:
    name: str
    max_length: int       # BOS + prompt + response + EOS fits
    max_new_tokens: int   # the longest gold answer with its EOS, plus room for a wrong, longer one
    warmup_steps: int     # the short warm-up: SFT steps after which the model is still weak

    @property
    def data_dir(self):
        return os.path.join(DATA_ROOT, self.name)

    def test_size(self):
        """Records in the test split (the verdict's binomial noise depends on it)."""
        with open(os.path.join(self.data_dir, "test.jsonl"), encoding="utf-8") as f:
            return sum(1 for line in f if line.strip())


# Warm-ups measured on the validation split (seed 0, lr 3e-3, batch 32): arith is at exact match
# 0.20 after 300 steps; sort at 0.31 after 100 (and already 0.75 after 300).
TASKS = {"arith": Task("arith", max_length=16, max_new_tokens=6, warmup_steps=300),
         "sort": Task("sort", max_length=24, max_new_tokens=12, warmup_steps=100)}


@dataclass(frozen=True)
class Protocol:
    """What every comparison shares, and no arm tunes."""
    start_lr: float = 3e-3
    start_lr_warmup: int = 10       # linear learning-rate warm-up of the start's SFT, in steps
    batch_size: int = 32
    eval_every: int = 100           # the start's validation-loss checks, in SFT steps
    patience: int = 10              # checks without a new lowest validation loss before the start stops
    max_start_steps: int = 10_000
    spin_prompts: int = 1024        # the first N training prompts feed both arms
    iterations: int = 4
    temperature: float = 1.0        # SPIN's sampling of its own responses


@dataclass(frozen=True)
class Arm:
    kind: str                # "spin" or "sft"
    lr: float
    beta: float | None = None

    def __post_init__(self):
        if self.kind not in ARM_KINDS:
            raise ValueError(f"arm kind must be one of {ARM_KINDS}, got {self.kind!r}")
        if (self.beta is None) != (self.kind == "sft"):
            raise ValueError(f"a spin arm needs beta and an sft arm takes none, got {self}")

    @property
    def label(self):
        return f"{self.kind} lr {self.lr:g}" + (f" β {self.beta:g}" if self.beta is not None else "")


@dataclass
class Setup:
    """One (task, seed): the fresh model (reloaded into for every run), tokenizer, data, evaluation."""
    task: Task
    seed: int
    out_dir: str
    scorer: Scorer   # its forwards, on its ParallelContext (scorer.ctx)
    model: object
    tokenizer: object
    data: dict
    held_out: HeldOut
    progress: bool = False


@dataclass
class Start:
    kind: str
    step: int            # SFT steps of the start (for "converged": the best validation loss's step)
    stopped_at: int      # the step SFT ran to (the same as `step` for "warmup")
    row: dict            # its eval row: test exact match, validation loss, ...
    state: dict          # its weights (CPU)


def prepare(task, seed, out_dir, ctx, *, attention="auto", val_exact_match=False, progress=False):
    """The fresh tiny model of `seed` (saved in HF format under out_dir/base_model), its data, its evaluation."""
    if not all(os.path.isfile(os.path.join(task.data_dir, f"{s}.jsonl")) for s in ("train", "val", "test")):
        raise UsageError(f"task data missing under {task.data_dir}; regenerate it with "
                         f"python data/make_{task.name}.py")
    base_dir = create_default_model(os.path.join(out_dir, "base_model"), seed=seed)
    tokenizer = load_tokenizer(base_dir)
    data = {split: load_examples(os.path.join(task.data_dir, f"{split}.jsonl"), tokenizer,
                                 max_length=task.max_length, source=f"{task.name} {split} data")
            for split in ("train", "val", "test")}
    scorer = Scorer(ctx, Precision(), "logits")   # fp32, the model's own LM head: the CPU path
    held_out = HeldOut(data["test"], data["val"], scorer, tokenizer=tokenizer, max_length=task.max_length,
                       max_new_tokens=task.max_new_tokens, batch_size=256, micro_batch_size=64,
                       exact_match=True, val_exact_match=val_exact_match)   # the tasks have one right answer
    model = load_model(base_dir, attention=attention, device=ctx.device)
    # The layout the SPIN arm's trainer chooses (SpinTrainer sets the same), from the start: every
    # held-out number of the study is then scored alike, whichever run comes first.
    scorer.packing, _ = choose_packing(model, "precompute", None)
    return Setup(task, seed, out_dir, scorer, model, tokenizer, data, held_out, progress)


def make_starts(setup, protocol, kinds, metrics):
    """{kind: Start} for the requested start kinds, from one SFT run of the fresh model (run "sft_start")."""
    unknown = set(kinds) - set(START_KINDS)
    if unknown:
        raise UsageError(f"start kinds must be among {START_KINDS}, got {sorted(unknown)}")
    warmup_steps = setup.task.warmup_steps
    converge = "converged" in kinds
    steps = protocol.max_start_steps if converge else warmup_steps
    eval_at = sorted({warmup_steps, *range(protocol.eval_every, steps + 1, protocol.eval_every)}) if converge \
        else [warmup_steps]
    early = EarlyStopping(setup.model, protocol.patience)
    starts = {}

    def stop(row):
        if row["step"] == warmup_steps:
            starts["warmup"] = Start("warmup", warmup_steps, warmup_steps, row, full_state_dict(setup.model))
        return early(row) if converge else row["step"] >= warmup_steps

    rows = run_sft(setup.model, setup.tokenizer, setup.data["train"], setup.scorer, steps=steps, lr=protocol.start_lr,
                   micro_batch_size=protocol.batch_size, global_batch_size=protocol.batch_size, seed=setup.seed,
                   metrics=metrics, run="sft_start", held_out=setup.held_out, eval_at=eval_at,
                   warmup_steps=protocol.start_lr_warmup, progress=setup.progress, stop=stop)
    if converge:
        best_row = next(r for r in rows if r["step"] == early.best_step)
        starts["converged"] = Start("converged", early.best_step, rows[-1]["step"], best_row, early.best_state)
    return {kind: starts[kind] for kind in kinds}


def run_arm(setup, start, arm, protocol, metrics, *, run=None, out_dir=None):
    """Eval rows (iteration 0 = the start, then one per iteration end) of `arm` trained from `start`.

    The model is left holding the arm's final weights.
    """
    run = run or arm.kind
    setup.model.load_state_dict(start.state)
    prompts = setup.data["train"][:protocol.spin_prompts]
    steps_per_iteration = len(prompts) // protocol.batch_size
    if arm.kind == "spin":
        sampling = SamplingConfig(max_new_tokens=setup.task.max_new_tokens, do_sample=True,
                                  temperature=protocol.temperature)
        trainer = SpinTrainer(setup.model, setup.tokenizer, prompts, setup.data["val"],
                              spin_config(setup, arm, protocol), setup.scorer, out_dir=out_dir or setup.out_dir,
                              held_out=setup.held_out, metrics=metrics, sampling=sampling, run=run)
        assert trainer.steps_per_iteration == [steps_per_iteration] * protocol.iterations
        return trainer.train()
    boundaries = [steps_per_iteration * (t + 1) for t in range(protocol.iterations)]
    return run_sft(setup.model, setup.tokenizer, prompts, setup.scorer, steps=boundaries[-1], lr=arm.lr,
                   micro_batch_size=protocol.batch_size, global_batch_size=protocol.batch_size, seed=setup.seed,
                   metrics=metrics, run=run, held_out=setup.held_out, eval_at=boundaries, progress=setup.progress)


def spin_config(setup, arm, protocol):
    """The RunConfig of a SPIN arm: one epoch per iteration at the protocol's batch size."""
    config = RunConfig()
    config.spin.iterations, config.spin.epochs = protocol.iterations, 1
    config.spin.beta, config.spin.lr = (arm.beta,), (arm.lr,)
    config.train.micro_batch_size = config.train.global_batch_size = protocol.batch_size
    config.data.max_length = setup.task.max_length
    config.generation.max_new_tokens, config.generation.temperature = setup.task.max_new_tokens, protocol.temperature
    config.generation.gen_batch_size = 256
    config.run.seed, config.run.keep, config.run.no_progress = setup.seed, 1, not setup.progress
    return config.check()


def validation_score(final_rows):
    """How the study ranks grid points, on the validation split only (higher is better): the summed
    final validation exact match, ties broken by the lower summed validation loss. One row chooses
    per seed; one row per seed chooses on average over the seeds (the demo's choice)."""
    return (sum(r["val_exact_match"] for r in final_rows), -sum(r["val_sft_loss"] for r in final_rows))


def choose_run(runs, kind):
    """The run of arm `kind` whose grid point validation_score ranks first."""
    return max((r for r in runs if r["arm"] == kind), key=lambda r: validation_score([r["rows"][-1]]))


def metrics_log(path):
    """A fresh metrics file (an earlier one at `path` is replaced)."""
    if os.path.exists(path):
        os.remove(path)
    return MetricsLog(path)
