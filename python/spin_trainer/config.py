"""The run's settings: one tree of dataclasses, from which the command line and `--config FILE` are
made (options.py). Each setting is declared once, below, with its type, default, help, check and
whether a resumed run must keep it (`resume=True`: changing it changes the results). Its option is
the field's name with dashes, also as a config file's key; OUT/config.yaml holds the resolved
settings, which `--resume` compares against. Lower modules receive values, never option names: a
mistake they find is a `UsageError` that names the setting through `errors.option`.
"""
import math
import sys
from dataclasses import dataclass, field, fields

from .errors import UsageError, option
from .records import check_fields

DTYPES = ("float32", "bfloat16", "float16")
HEADS = ("fused", "logits")
ATTENTION = ("auto", "flash_attention_2", "sdpa", "eager")
REFERENCE_MODES = ("precompute", "swap", "resident", "streamed")
RECOMPUTE_MODES = ("none", "elementwise", "full")
LR_SCHEDULES = ("constant", "linear", "cosine")
OPTIMIZERS = ("adamw", "rmsprop")
REPORT_TO = ("none", "tensorboard", "wandb")
LONG_PROMPT_POLICIES = ("truncate", "skip", "error")


def setting(default, help, *, check=None, resume=False, saved=True, choices=None, nargs=None, metavar=None):
    """A field of the tree; `check(value)` says what is wrong with a value (None: nothing)."""
    return field(default=default, metadata=dict(help=help, check=check, resume=resume, saved=saved, choices=choices,
                                                nargs=nargs, metavar=metavar))


def shown(v):
    """A value as the user typed it: one number of a list alone, several as a list."""
    return (v[0] if len(v) == 1 else list(v)) if isinstance(v, tuple) else v


def each(ok, wanted):
    """The check that every value (one, or each of a list) passes `ok`: else "must be `wanted`, got ..."."""
    def check(v):
        return None if all(map(ok, v if isinstance(v, tuple) else (v,))) else f"must be {wanted}, got {shown(v)}"
    return check


def at_least(low):
    return each(lambda x: x >= low, f">= {low}")


def finite_at_least(low, strict=False):
    return each(lambda x: math.isfinite(x) and (x > low if strict else x >= low),
                f"finite and {'>' if strict else '>='} {low}")


def within(low, high, low_open=False, high_open=False):
    return each(lambda x: (low < x if low_open else low <= x) and (x < high if high_open else x <= high),
                f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}")


def optional(check):
    return lambda v: None if v is None else check(v)


def per_iteration(values, iterations):
    """One float per iteration of a --beta or --lr list: a single value is repeated; a longer list
    (a recipe's values for more iterations than this run has) gives its first `iterations`."""
    values = [float(v) for v in values]
    return values * iterations if len(values) == 1 else values[:iterations]


@dataclass
class ModelSettings:
    model: str | None = setting(None, "local Hugging Face causal-LM directory or a Hub id (or, with --plan, a "
                                      "directory holding only its config.json)")
    trust_remote_code: bool = setting(False, "run the Python code a model directory ships (its config.json's "
                                             "auto_map); without it such a model is refused")
    dtype: str = setting("float32", "compute dtype; bfloat16 on GPUs: bf16 compute with fp32 master weights, fp32 "
                                    "gradient reduction and fp32 optimizer state (float16 has no loss scaling here)",
                         choices=DTYPES, resume=True)
    pure_low_precision: bool = setting(False, "keep the parameters, gradients and optimizer state themselves in "
                                              "--dtype (half the weight memory; updates smaller than a weight's "
                                              "rounding step, e.g. at lr 5e-7 in bf16, are lost)", resume=True)
    head: str | None = setting(None, "how the LM head scores tokens: fused (hidden states -> log-probs, never "
                                     "materializing the [tokens, vocab] logits) or logits (the model's head, then "
                                     "the log-prob kernels). Default: fused on CUDA, logits elsewhere", choices=HEADS)
    attn: str = setting("auto", "attention kernel; auto: flash_attention_2 if usable, else sdpa", choices=ATTENTION)
    device: str = setting("auto", "auto, cpu or cuda", choices=("auto", "cpu", "cuda"))
    export_dtype: str = setting("auto", "dtype of the final Hugging Face model (OUT/final); auto: the input model's "
                                        "config.torch_dtype", choices=("auto",) + DTYPES)
    export_every_iteration: bool = setting(True, "export each iteration's model to OUT/iter-N besides OUT/final "
                                                 "(--no-export-every-iteration: OUT/final only)")
    iteration_export_dtype: str = setting("bfloat16", "dtype of the OUT/iter-N exports; auto: the input model's "
                                                      "config.torch_dtype", choices=("auto",) + DTYPES)


@dataclass
class DataSettings:
    train_data: str | None = setting(None, "training prompts and gold responses: a JSONL, JSON or Parquet file, a "
                                           "datasets save_to_disk directory or a Hub dataset name")
    val_data: str | None = setting(None, "held-out records (as --train-data): SFT validation loss and SPIN acc on "
                                         "held-out pairs")
    test_data: str | None = setting(None, "held-out records (as --train-data) for exact-match accuracy (giving it "
                                          "turns --exact-match on)")
    train_split: str | None = setting(None, "split of --train-data (default: its only split, or 'train')", resume=True)
    val_split: str | None = setting(None, "split of --val-data (default: its only split, or 'train')", resume=True)
    test_split: str | None = setting(None, "split of --test-data (default: its only split, or 'train')", resume=True)
    prompt_field: str | None = setting(None, "read each record's prompt from this field (a string or a list of "
                                             "messages); with --response-field", resume=True)
    response_field: str | None = setting(None, "read each record's gold response from this field (a string or one "
                                               "assistant message); with --prompt-field", resume=True)
    messages_field: str | None = setting(None, "read each record as a conversation from this field (the last "
                                               "message is the assistant's response)", resume=True)
    prompt_template: str = setting("{prompt}", "template of string prompts (not of chat records)", resume=True)
    max_length: int = setting(1024, "context length: prompt + response tokens (at most the model's "
                                    "max_position_embeddings)", check=at_least(2), resume=True)
    max_prompt_length: int | None = setting(None, "most prompt tokens (default: --max-length - 1); see "
                                                  "--long-prompts", check=optional(at_least(1)), resume=True)
    long_prompts: str = setting("truncate", "a prompt over --max-prompt-length: truncate (cut from the left, BOS "
                                            "kept, as TRL), skip the record, or error", choices=LONG_PROMPT_POLICIES,
                                resume=True)

    def record_fields(self):
        return self.prompt_field, self.response_field, self.messages_field


@dataclass
class SpinSettings:
    iterations: int = setting(2, "SPIN iterations (θ_t → θ_t+1)", check=at_least(1), resume=True)
    epochs: int = setting(1, "epochs over the iteration's pairs", check=at_least(1), resume=True)
    beta: tuple[float, ...] = setting((0.1,), "one value, or one per iteration (of a longer list, the first "
                                              "--iterations)", check=finite_at_least(0, True), resume=True)
    # lr >= 1 moves AdamW/RMSprop weights by about their own size each step; 0 trains nothing.
    lr: tuple[float, ...] = setting((5e-7,), "one value, or one per iteration (of a longer list, the first "
                                             "--iterations)", resume=True,
                                    check=within(0, 1, low_open=True, high_open=True))
    loss_type: str = setting("sigmoid", "sigmoid (the paper) or hinge", choices=("sigmoid", "hinge"), resume=True)
    reference: str = setting("precompute", "the reference policy θ_t: its log-probs precomputed at each iteration's "
                                           "start, swapped in from host memory per batch, a resident copy, or "
                                           "streamed layer by layer from host memory", choices=REFERENCE_MODES,
                             resume=True)
    generate_every: str = setting("iteration", "iteration: once from θ_t; epoch: every epoch with the reference "
                                               "swapped in", choices=("iteration", "epoch"), resume=True)
    mix_previous: float = setting(0.0, "fraction of the previous iteration's pairs mixed in", check=within(0, 1),
                                  resume=True)
    drop_truncated: bool = setting(False, "leave out of training the pairs whose generation was cut at "
                                          "--max-new-tokens (their slots go to other pairs of the iteration)",
                                   resume=True)


@dataclass
class TrainSettings:
    micro_batch_size: int = setting(1, "pairs per forward on each rank", check=at_least(1))
    global_batch_size: int = setting(8, "pairs per optimizer step, all ranks together", check=at_least(1), resume=True)
    optimizer: str = setting("adamw", "the SPIN paper's recipe uses rmsprop", choices=OPTIMIZERS, resume=True)
    adam_betas: tuple[float, ...] = setting((0.9, 0.999), "AdamW betas", nargs=2, metavar=("BETA1", "BETA2"),
                                            check=lambda v: None if all(0 <= b < 1 for b in v)
                                            else f"must be two values in [0, 1), got {list(v)}", resume=True)
    # A larger epsilon swamps the gradient's scale (the step becomes lr * g / eps: nothing trains).
    adam_eps: float = setting(1e-8, "AdamW's and RMSprop's epsilon", check=within(0, 1e-2, low_open=True), resume=True)
    weight_decay: float = setting(0.0, "weight decay of the weight matrices (biases and norm weights never decay, as "
                                       "in Hugging Face's Trainer; AdamW: decoupled; RMSprop: L2)",
                                  check=within(0, 1), resume=True)
    optimizer_state: str = setting("reset", "reset: a fresh optimizer at each SPIN iteration's start (the paper "
                                            "runs each iteration as a fresh run from θ_t); keep: the moments carry "
                                            "over", choices=("reset", "keep"), resume=True)
    max_grad_norm: float = setting(1.0, "0 disables clipping", check=finite_at_least(0), resume=True)
    lr_schedule: str = setting("constant", "shape of the learning rate after the warm-up, as transformers' "
                                           "get_*_schedule_with_warmup (the paper: linear with --warmup-ratio 0.1)",
                               choices=LR_SCHEDULES, resume=True)
    schedule_span: str = setting("iteration", "the schedule restarts every iteration (the paper) or spans the "
                                              "whole run (NeMo-Aligner)", choices=("iteration", "run"), resume=True)
    warmup_ratio: float = setting(0.0, "linear warm-up over this fraction of the span's steps",
                                  check=within(0, 1), resume=True)
    warmup_steps: int = setting(0, "warm-up steps of the span; when > 0 it overrides --warmup-ratio",
                                check=at_least(0), resume=True)
    optimizer_in_backward: bool = setting(False, "update each parameter as soon as its gradient is complete, "
                                                 "freeing it (needs one micro-batch per step and --max-grad-norm 0)",
                                          resume=True)
    offload_optimizer: bool = setting(False, "optimizer state in host memory while generating")
    # Neither changes the results beyond fp32 rounding: a resumed run may change them.
    pack_pairs: bool | None = setting(None, "each micro-batch of pairs or SFT sequences as one row, each prompt once, "
                                            "no padding (default: on where it can run: Llama, Mistral, Qwen2)")
    max_tokens_per_batch: int = setting(0, "tokens a micro-batch holds at most, as computed (the packed row, or padded "
                                           "rows x the longest); a longer pair goes alone (0: off)", check=at_least(0))


@dataclass
class GenerationSettings:
    max_new_tokens: int | None = setting(None, "default: half of --max-length (as NeMo-Aligner); always capped by "
                                               "the context left after each prompt. A response cut there is trained "
                                               "on as sampled, without an EOS (see --drop-truncated)",
                                         check=optional(at_least(1)), resume=True)
    min_new_tokens: int = setting(0, "tokens before a response may end (EOS and stops masked)", check=at_least(0),
                                  resume=True)
    stop: tuple[str, ...] = setting((), "strings that end a response besides the EOS ids (matched as the tokens of "
                                        "the string alone; kept in the response)", metavar="TEXT", resume=True)
    stop_ids: tuple[int, ...] = setting((), "token ids that end a response, as --stop", metavar="ID", resume=True)
    greedy: bool = setting(False, "greedy decoding instead of sampling", resume=True)
    temperature: float = setting(1.0, "sampling temperature", check=finite_at_least(0, True), resume=True)
    top_p: float = setting(1.0, "nucleus sampling (1: off)", check=within(0, 1, low_open=True), resume=True)
    top_k: int = setting(0, "top-k sampling (0: off)", check=at_least(0), resume=True)
    gen_batch_size: int = setting(64, "prompts per generation batch", check=at_least(1))


@dataclass
class ParallelSettings:
    tp: int = setting(1, "tensor-parallel size (torchrun --nproc_per_node a multiple of it)", check=at_least(1))
    dp_shard: bool | None = setting(None, "FSDP2 on the data-parallel axis: parameters, gradients and optimizer "
                                          "state sharded (default: on with more than one data-parallel rank); "
                                          "--no-dp-shard keeps a full replica on every rank")
    recompute: str = setting("none", "activation recompute of the decoder layers: elementwise (norms, SwiGLU "
                                     "product) or full layers", choices=RECOMPUTE_MODES)


@dataclass
class RunSettings:
    out: str | None = setting(None, "output directory (config.yaml, metrics, checkpoints, final model); required "
                                    "except with --plan")
    seed: int = setting(0, "data order, sampling and initialization", resume=True)
    # saved=False: an action of this command; a config.yaml reused for a new run starts that run
    resume: bool = setting(False, "continue from the newest intact checkpoint in --out, also with another process "
                                  "count or --tp", saved=False)
    save_every: int = setting(0, "a checkpoint every N optimizer steps besides the one at each iteration's end",
                              check=at_least(0))
    val_every: int = setting(0, "validation every N optimizer steps besides the evaluated iterations' ends",
                             check=at_least(0))
    eval_every: int = setting(1, "held-out evaluation of the starting model and after every N-th iteration (and the "
                                 "last): SFT validation loss, SPIN acc and margin on the validation pairs, exact "
                                 "match where asked", check=at_least(1))
    exact_match: bool = setting(False, "also evaluate greedy exact match against the gold responses of --test-data "
                                       "(default --val-data): for tasks with one right answer (about 0 on chat data); "
                                       "a generation over every test prompt at each evaluation")
    keep: int = setting(2, "checkpoints kept", check=at_least(1))
    max_steps: int = setting(0, "stop after N optimizer steps of the run (counted across resumes) with a "
                                "checkpoint, without exporting; --resume continues (0: no limit)", check=at_least(0))
    no_progress: bool = setting(False, "no progress bars (bars show only on a terminal anyway)")
    log_every: int = setting(10, "with stdout not a terminal (a log file), or without progress bars: a plain line "
                                 "every N optimizer steps (0: none), besides one per generation and evaluation",
                             check=at_least(0))
    report_to: tuple[str, ...] = setting(("none",), "also send the metrics to these (TensorBoard: OUT/runs; wandb: "
                                                   "OUT/wandb, WANDB_* variables apply)", choices=REPORT_TO)


@dataclass
class PlanSettings:
    plan: bool = setting(False, "print the per-rank memory plan of this run on --nproc processes and exit: the "
                                "model is built on the meta device from --model's config.json alone, on a fake "
                                "process group (e.g. --model configs/llama-3-70b --nproc 64 --tp 8)")
    nproc: int | None = setting(None, "--plan: the number of processes (GPUs) of the run", check=optional(at_least(1)))
    device_memory_gib: float | None = setting(None, "memory of one device: --plan compares its estimate with it "
                                                    "(default 80); training with --no-dp-shard uses the visible "
                                                    "GPU's memory, or this on a CPU run",
                                              check=optional(finite_at_least(0, True)))
    host_memory_gib: float | None = setting(None, "--plan: host memory of one node, against which the plan checks "
                                                  "its per-node host estimate (default 2048: an 8-GPU H100/H200 "
                                                  "node)", check=optional(finite_at_least(0, True)))
    gpus_per_node: int | None = setting(None, "--plan: processes (GPUs) per node (default 8, or --nproc if fewer)",
                                        check=optional(at_least(1)))


@dataclass
class RunConfig:
    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    spin: SpinSettings = field(default_factory=SpinSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    parallel: ParallelSettings = field(default_factory=ParallelSettings)
    run: RunSettings = field(default_factory=RunSettings)
    plan: PlanSettings = field(default_factory=PlanSettings)

    # ---- derived values --------------------------------------------------------------------------
    def per_iteration(self, name):
        """--beta or --lr as one value per iteration."""
        return per_iteration(getattr(self.spin, name), self.spin.iterations)

    @property
    def max_new_tokens(self):
        """--max-new-tokens, by default half the context (each prompt's cap is what is left after it)."""
        given = self.generation.max_new_tokens
        return given if given is not None else max(1, self.data.max_length // 2)

    @property
    def progress(self):
        """Progress bars on a terminal only: in a log file each redraw would be a line of its own."""
        return not self.run.no_progress and sys.stderr.isatty()

    @property
    def exact_match(self):
        """Exact match is measured where asked: --exact-match, or a --test-data (which serves nothing else)."""
        return self.run.exact_match or bool(self.data.test_data)

    def evaluates(self, iteration):
        """Whether the end of `iteration` (0-based) gets the held-out evaluation (--eval-every; the last does)."""
        return (iteration + 1) % self.run.eval_every == 0 or iteration + 1 == self.spin.iterations

    def mixed_pairs(self, iteration, num_examples):
        """Pairs of the previous iteration mixed into `iteration` (0-based) of `num_examples` prompts."""
        return int(round(self.spin.mix_previous * num_examples)) if iteration > 0 else 0

    # ---- checks ----------------------------------------------------------------------------------
    def check(self):
        """Each setting on its own, then the ones that depend on each other (before any file is read)."""
        for _, f, value in self.items():
            if value is None and f.default is None:
                continue
            problem = f.metadata["check"] and f.metadata["check"](value)
            if problem:
                raise UsageError(f"{option(f.name)} {problem}")
            values = value if isinstance(value, tuple) else (value,)
            if f.metadata["choices"] and value is not None and any(v not in f.metadata["choices"] for v in values):
                raise UsageError(f"{option(f.name)} must be one of {', '.join(f.metadata['choices'])}, got {value!r}")
        for name in ("beta", "lr"):
            count = len(getattr(self.spin, name))
            if count != 1 and count < self.spin.iterations:
                raise UsageError(f"{option(name)}: give one value or at least one per iteration "
                                 f"({self.spin.iterations}), got {count}")
        if self.generation.min_new_tokens > self.max_new_tokens:
            raise UsageError(f"{option('min_new_tokens')} must be in [0, {option('max_new_tokens')} "
                             f"{self.max_new_tokens}], got {self.generation.min_new_tokens}")
        if self.model.pure_low_precision and self.model.dtype == "float32":
            raise UsageError(f"{option('pure_low_precision')} needs {option('dtype')} bfloat16 or float16 (float32 "
                             f"is already pure)")
        if self.data.max_prompt_length is not None and self.data.max_prompt_length >= self.data.max_length:
            raise UsageError(f"{option('max_prompt_length')} {self.data.max_prompt_length} must be less than "
                             f"{option('max_length')} {self.data.max_length} (a response needs a token)")
        check_fields(*self.data.record_fields())
        if self.spin.reference == "streamed" and self.model.dtype != "float32" and not self.model.pure_low_precision:
            raise UsageError(f"{option('reference')} streamed runs a plain model, but {option('dtype')} "
                             f"{self.model.dtype} with fp32 master weights casts through FSDP in every layout; use "
                             f"{option('reference')} swap (or precompute)")
        if self.train.optimizer_in_backward and self.train.max_tokens_per_batch:   # it steps once per micro-batch
            raise UsageError(f"{option('optimizer_in_backward')} needs one micro-batch per step, and "
                             f"{option('max_tokens_per_batch')} may cut a step into several; drop one of them")
        if self.run.exact_match and not (self.data.test_data or self.data.val_data):
            raise UsageError(f"{option('exact_match')} measures on {option('test_data')} (or {option('val_data')}); "
                             f"give one of them")
        if "{prompt}" not in self.data.prompt_template:
            raise UsageError(f"{option('prompt_template')} {self.data.prompt_template!r}: must contain {{prompt}}")
        return self

    def check_layout(self, dp_size, dp_shard, num_examples):
        """The batch sizes against the data-parallel size and the data (before the model is loaded)."""
        t = self.train
        if t.global_batch_size % (t.micro_batch_size * dp_size) != 0:
            raise UsageError(f"{option('global_batch_size')} {t.global_batch_size} must be a multiple of "
                             f"{option('micro_batch_size')} {t.micro_batch_size} x data-parallel size {dp_size}")
        if num_examples < t.global_batch_size:
            raise UsageError(f"{option('global_batch_size')} {t.global_batch_size} is larger than the "
                             f"{num_examples} training prompts")
        if not t.optimizer_in_backward:
            return
        micro = t.global_batch_size // (t.micro_batch_size * dp_size)
        if micro != 1:
            raise UsageError(
                f"{option('optimizer_in_backward')} needs one micro-batch per step on each rank, but "
                f"{option('global_batch_size')} {t.global_batch_size} = {micro} x {option('micro_batch_size')} "
                f"{t.micro_batch_size} x data-parallel size {dp_size} accumulates {micro}; set "
                f"{option('micro_batch_size')} {t.global_batch_size // dp_size} or drop "
                f"{option('optimizer_in_backward')}")
        if t.max_grad_norm > 0:
            raise UsageError(f"{option('optimizer_in_backward')} cannot clip (each parameter is updated before the "
                             f"global gradient norm is known); pass {option('max_grad_norm')} 0 (it is "
                             f"{t.max_grad_norm}) or drop {option('optimizer_in_backward')}")
        if dp_size > 1 and not dp_shard:
            raise UsageError(f"{option('optimizer_in_backward')} with {option('dp_shard', negated=True)} is not "
                             f"supported; use FSDP or drop {option('optimizer_in_backward')}")

    # ---- the tree as rows ------------------------------------------------------------------------
    def items(self):
        """(group, field, value) of every setting."""
        for group_name in GROUPS:
            group = getattr(self, group_name)
            for f in fields(group):
                yield group, f, getattr(group, f.name)

    def as_options(self, resume_only=False):
        """{long option name: value} in the config file's form (lists for tuples)."""
        return {f.name.replace("_", "-"): list(v) if isinstance(v, tuple) else v
                for _, f, v in self.items() if f.metadata["saved"] and (f.metadata["resume"] or not resume_only)}

    def resume_mismatches(self, saved):
        """[(option, saved value, this run's value)] of the settings a resumed run must keep. More
        --iterations extend the run: --beta and --lr must then agree on the iterations it had."""
        before = saved.get("iterations")
        extends = isinstance(before, int) and self.spin.iterations >= before
        mismatches = []
        for key, value in self.as_options(resume_only=True).items():
            if key == "iterations" and extends:
                continue
            if key in ("beta", "lr") and extends and isinstance(saved.get(key), list) and \
                    self.per_iteration(key)[:before] == per_iteration(saved[key], before):
                continue
            if saved.get(key) != value:
                mismatches.append((option(key.replace("-", "_")), saved.get(key), value))
        return mismatches


GROUPS = {f.name: f.default_factory for f in fields(RunConfig)}   # {"model": ModelSettings, ...}
