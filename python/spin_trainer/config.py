"""Settings of a SPIN run (filled from the command line by python/train.py) and their validation.

Error messages name the command-line option, since that is what the user typed.
"""
import math
from dataclasses import asdict, dataclass, field

from .generation import SamplingConfig
from .optim import OPTIMIZERS
from .schedule import LR_SCHEDULES, check_batch_sizes, micro_batches_per_step

# Fields whose command-line option is not "--" + the field's name with dashes.
# Fields whose option is not "--" + the field name (SamplingConfig's included).
FIELD_OPTIONS = {"betas": "--beta", "lrs": "--lr", "stop_sequences": "--stop/--stop-ids"}
# Settings a resumed run may change: they change no result (batch sizes per forward: no result
# beyond float rounding, and another data-parallel size may need another micro-batch size).
FREE_ON_RESUME = ("progress", "keep", "save_every", "offload_optimizer", "max_steps", "val_every",
                  "micro_batch_size", "gen_batch_size")

REFERENCE_MODES = ("precompute", "swap", "resident")
GENERATE_EVERY = ("iteration", "epoch")
LOSS_TYPES = ("sigmoid", "hinge")


def per_iteration(values, iterations, option):
    """One value for every iteration: a single value is repeated; otherwise exactly `iterations`."""
    values = [float(v) for v in values]
    if len(values) == 1:
        return values * iterations
    if len(values) != iterations:
        raise ValueError(f"{option}: give one value or one per iteration ({iterations}), got {len(values)}")
    return values


def sampling_config(*, max_new_tokens, do_sample, temperature, top_p, top_k, min_new_tokens=0):
    """SamplingConfig of the command-line options, checked first so that errors name the option."""
    checks = [
        (max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {max_new_tokens}"),
        (0 <= min_new_tokens <= max_new_tokens,
         f"--min-new-tokens must be in [0, --max-new-tokens {max_new_tokens}], got {min_new_tokens}"),
        (math.isfinite(temperature) and temperature > 0, f"--temperature must be finite and > 0, got {temperature}"),
        (0 < top_p <= 1, f"--top-p must be in (0, 1], got {top_p}"),
        (top_k >= 0, f"--top-k must be >= 0, got {top_k}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    return SamplingConfig(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                          top_p=top_p, top_k=top_k, min_new_tokens=min_new_tokens)


def stop_sequences(strings, ids, tokenizer):
    """Token-id sequences of --stop strings (each tokenized alone, no special tokens) and --stop-ids
    (one token each). A string is matched as that token sequence; where the tokenizer merges it
    with the text before it differently, the stop is missed."""
    sequences = []
    for text in strings:
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not tokens:
            raise ValueError(f"--stop {text!r}: the tokenizer gives no tokens for it")
        sequences.append(tuple(tokens))
    for token in ids:
        if not 0 <= token < len(tokenizer):
            raise ValueError(f"--stop-ids {token}: not a token id of the tokenizer [0, {len(tokenizer)})")
        sequences.append((token,))
    return tuple(sequences)


@dataclass
class SpinConfig:
    iterations: int = 2
    epochs: int = 1
    betas: tuple = (0.1,)
    lrs: tuple = (5e-7,)
    loss_type: str = "sigmoid"
    micro_batch_size: int = 1
    global_batch_size: int = 8
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optimizer: str = "adamw"
    adam_betas: tuple = (0.9, 0.999)
    adam_eps: float = 1e-8
    lr_schedule: str = "constant"
    warmup_ratio: float = 0.0
    optimizer_in_backward: bool = False
    generate_every: str = "iteration"
    mix_previous: float = 0.0
    reference: str = "precompute"
    # How θ_t answers the prompts; the seed is set per iteration and epoch (rollouts.sampling_seed).
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_new_tokens=128))
    gen_batch_size: int = 64
    drop_truncated: bool = False  # leave out pairs whose generation was cut at the length cap
    offload_optimizer: bool = False
    max_length: int = 1024
    seed: int = 0
    save_every: int = 0
    keep: int = 2
    max_steps: int = 0          # 0: no limit
    val_every: int = 0          # 0: validation at iteration ends only
    progress: bool = True

    def __post_init__(self):
        if self.iterations < 1:
            raise ValueError(f"--iterations must be >= 1, got {self.iterations}")
        self.adam_betas = tuple(float(b) for b in self.adam_betas)
        self.betas = per_iteration(self.betas, self.iterations, "--beta")
        self.lrs = per_iteration(self.lrs, self.iterations, "--lr")
        self.check_values()

    def optimizer_options(self):
        """make_optimizer's keyword arguments."""
        return dict(name=self.optimizer, weight_decay=self.weight_decay, betas=tuple(self.adam_betas),
                    eps=self.adam_eps, in_backward=self.optimizer_in_backward)

    def schedule_options(self):
        """learning_rate_schedule's keyword arguments."""
        return dict(shape=self.lr_schedule, warmup_ratio=self.warmup_ratio, warmup_steps=self.warmup_steps)

    def resume_settings(self):
        """{command-line option: value} that a resumed run must share with the checkpoint."""
        settings = {}
        for name, value in vars(self).items():
            if name in FREE_ON_RESUME:
                continue
            if name != "sampling":
                settings[FIELD_OPTIONS.get(name, "--" + name.replace("_", "-"))] = (
                    list(value) if isinstance(value, tuple) else value)
                continue
            for sampling_name, sampling_value in asdict(value).items():
                if sampling_name == "do_sample":
                    settings["--greedy"] = not sampling_value
                elif sampling_name != "seed":   # set per iteration and epoch from --seed
                    settings[FIELD_OPTIONS.get(sampling_name, "--" + sampling_name.replace("_", "-"))] = sampling_value
        return settings

    def mixed_pairs(self, num_examples):
        return int(round(self.mix_previous * num_examples))

    def pairs_in_iteration(self, iteration, num_examples):
        return num_examples + (self.mixed_pairs(num_examples) if iteration > 0 else 0)

    def check_values(self):
        """Each setting on its own (at construction: before any file or model is read)."""
        checks = [
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (all(math.isfinite(b) and b > 0 for b in self.betas), f"--beta must be finite and > 0, got {self.betas}"),
            (all(math.isfinite(lr) and lr >= 0 for lr in self.lrs), f"--lr must be finite and >= 0, got {self.lrs}"),
            (math.isfinite(self.weight_decay) and self.weight_decay >= 0,
             f"--weight-decay must be finite and >= 0, got {self.weight_decay}"),
            (math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0,
             f"--max-grad-norm must be finite and >= 0 (0: no clipping), got {self.max_grad_norm}"),
            (self.loss_type in LOSS_TYPES, f"--loss-type must be one of {LOSS_TYPES}, got {self.loss_type!r}"),
            (self.reference in REFERENCE_MODES,
             f"--reference must be one of {REFERENCE_MODES}, got {self.reference!r}"),
            (self.generate_every in GENERATE_EVERY,
             f"--generate-every must be one of {GENERATE_EVERY}, got {self.generate_every!r}"),
            (0.0 <= self.mix_previous <= 1.0, f"--mix-previous must be in [0, 1], got {self.mix_previous}"),
            (self.gen_batch_size >= 1, f"--gen-batch-size must be >= 1, got {self.gen_batch_size}"),
            (self.warmup_steps >= 0, f"--warmup-steps must be >= 0, got {self.warmup_steps}"),
            (self.save_every >= 0, f"--save-every must be >= 0, got {self.save_every}"),
            (self.keep >= 1, f"--keep must be >= 1, got {self.keep}"),
            (self.max_steps >= 0, f"--max-steps must be >= 0, got {self.max_steps}"),
            (self.val_every >= 0, f"--val-every must be >= 0, got {self.val_every}"),
            (self.optimizer in OPTIMIZERS, f"--optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}"),
            (len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas),
             f"--adam-betas must be two values in [0, 1), got {list(self.adam_betas)}"),
            (self.adam_eps > 0, f"--adam-eps must be > 0, got {self.adam_eps}"),
            (self.lr_schedule in LR_SCHEDULES,
             f"--lr-schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}"),
            (0.0 <= self.warmup_ratio <= 1.0, f"--warmup-ratio must be in [0, 1], got {self.warmup_ratio}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def validate(self, num_examples, ctx):
        """The settings against the data and the process layout (once, by the command line, before
        the model is loaded)."""
        check_batch_sizes(self.global_batch_size, self.micro_batch_size, ctx.dp_size, num_examples,
                          "training prompts")
        if self.optimizer_in_backward:
            self.check_optimizer_in_backward(ctx)

    def check_optimizer_in_backward(self, ctx):
        """The optimizer steps inside the backward only where one backward makes a step's whole gradient."""
        micro = micro_batches_per_step(self.global_batch_size, self.micro_batch_size, ctx.dp_size)
        if micro != 1:
            raise ValueError(
                f"--optimizer-in-backward needs one micro-batch per step on each rank, but --global-batch-size "
                f"{self.global_batch_size} = {micro} x --micro-batch-size {self.micro_batch_size} x data-parallel "
                f"size {ctx.dp_size} accumulates {micro}; set --micro-batch-size "
                f"{self.global_batch_size // ctx.dp_size} or drop --optimizer-in-backward")
        if self.max_grad_norm > 0:
            raise ValueError(f"--optimizer-in-backward cannot clip (each parameter is updated before the global "
                             f"gradient norm is known); pass --max-grad-norm 0 (it is {self.max_grad_norm}) or drop "
                             f"--optimizer-in-backward")
        if ctx.dp_size > 1 and not ctx.dp_shard:
            raise ValueError("--optimizer-in-backward with --no-dp-shard: the replicas' gradients are summed only "
                             "after the backward; use --dp-shard (FSDP) or drop --optimizer-in-backward")
