"""What one layout computes at an iteration's first step, where the policy is θ_t (no tests here):
test_train_parallel.py runs it in one process and on 2 gloo processes and compares the bits."""
import torch

from trainer_cases import fixed_pairs

from spin_trainer.generation.decode import SamplingConfig
from spin_trainer.generation.rollouts import generate, pair_logps
from spin_trainer.logprobs import Scorer
from spin_trainer.model import load_model, load_tokenizer
from spin_trainer.data import collate_pairs
from spin_trainer.parallel.apply import parallelize_model
from spin_trainer.parallel.mesh import gather_objects, setup_parallel, shard_range, teardown_parallel
from spin_trainer.parallel.precision import Precision

PAIRS = 4
NEW_TOKENS = 6
FIRST_STEP_CASES = [(dtype, head) for dtype in ("float32", "bfloat16") for head in ("logits", "fused")]


def first_step(model_dir, dtype, head, tp=1):
    """{"logps": [P, 2] reference log-probs (the trainer's precompute, 2 pairs a micro-batch),
    "rewards": [2P] β·(π − ref) of the SPIN loss at θ_t (one pair a micro-batch, pairs in reverse
    order: other batch shapes than the reference's), "greedy"/"sampled": generations (fixed seed)},
    on every rank, in the layout of the process group (one process: its own 1-rank one, if any)
    with `tp`-way tensor parallelism."""
    precision = Precision(dtype)
    ctx = setup_parallel(tp, "cpu", fsdp_alone=precision.mixed)
    try:
        tokenizer = load_tokenizer(model_dir)
        model = parallelize_model(load_model(model_dir, attention="sdpa", dtype=precision.param_dtype_name,
                                             compute_dtype=dtype), ctx, precision)
        scorer = Scorer(ctx, precision, head)
        examples, generated = fixed_pairs(tokenizer, PAIRS)
        logps = pair_logps(model, examples, generated, scorer, micro_batch_size=2, pad_token_id=tokenizer.pad_token_id)
        model.train()
        rewards = []
        start, end = shard_range(PAIRS, ctx.dp_rank, ctx.dp_size)
        for i in reversed(range(start, end)):
            batch = collate_pairs(examples[i:i + 1], generated[i:i + 1], tokenizer.pad_token_id)
            out = scorer.pair_loss(model, batch, logps[i].clone(), beta=0.1, loss_type="sigmoid")
            out.loss.backward()
            rewards.append((i, out.rewards.tolist()))
        rewards = sorted(gather_objects(rewards, ctx.dp_group, ctx.dp_size))
        model.zero_grad(set_to_none=True)
        outputs = {}
        for name, sampling in (("greedy", SamplingConfig(NEW_TOKENS, do_sample=False)),
                               ("sampled", SamplingConfig(NEW_TOKENS, temperature=1.5, seed=11))):
            responses = generate(model, examples, sampling, scorer, tokenizer=tokenizer, max_length=32,
                                 batch_size=2, progress=False)
            outputs[name] = [list(r) for r in responses]
        return {"logps": logps, "rewards": torch.tensor([r for _, r in rewards]), **outputs}
    finally:
        if ctx.world_size == 1:
            teardown_parallel(ctx)
