"""`--plan`'s training-step terms against a real step of the trainer's own code, within 10%: one
process, the model parallelized as cli.py does it (in mixed precision FSDP's `fully_shard`, or
`replicate` with --no-dp-shard, on a data-parallel axis of one rank), SpinTrainer.train_step over
two micro-batches (from the second one on every gradient is there, as the plan counts them), the
bytes measured as the tensors the operators and FSDP allocate (tests/live_bytes.py).

The shapes make every term visible: weights, activations and FSDP's copies of a similar size.
Every batch is the plan's largest: padded, a pair of full rows (one prompt token, no padding:
2 rows x 128 tokens, all but the first of each row labelled); packed, pairs at the bound of
plan/micro_batch.py (one prompt token, a gold response to --max-length, a generated one of
--max-new-tokens), as many as the token budget holds. Besides the peak, the peak of the last two
decoder layers' backward is measured on its own: the plan's layer phases (the working set)."""
import itertools

import pytest
import torch

from live_bytes import LiveTensorBytes
from spin_kernels.loss import torch_backend
from trainer_cases import step_trainer

from spin_kernels.loss.ops import linear_logprobs
from spin_trainer.data import Example, collate_pairs
from spin_trainer.logprobs import Scorer
from spin_trainer.packed_scoring import pair_batch_tokens
from spin_trainer.packing import pack_pairs
from spin_trainer.model import build_tiny_llama
from spin_trainer.parallel.apply import decoder_layers, parallelize_model
from spin_trainer.parallel.mesh import setup_parallel, teardown_parallel
from spin_trainer.parallel.precision import Precision
from spin_trainer.plan.memory import memory_plan
from spin_trainer.plan.micro_batch import micro_batch

VOCAB, HIDDEN, MLP, LAYERS, LENGTH, PAIRS = 512, 256, 704, 3, 128, 1
# packed: micro-batches of 2 pairs cut at 384 tokens, what 2 pairs of at most 128 + 64 tokens take
# (--max-new-tokens: the default, half of --max-length)
PACKED_PAIRS, TOKEN_BOUND, NEW_TOKENS = 2, 384, LENGTH // 2


def full_pairs(vocab, length, count):
    g = torch.Generator().manual_seed(0)

    def response():
        return tuple(torch.randint(4, vocab, (length - 1,), generator=g).tolist())

    examples = [Example((1,), response()) for _ in range(count)]
    return collate_pairs(examples, [response() for _ in range(count)], 0)


def packed_pairs_at_the_bound(vocab, length, new_tokens, count):
    g = torch.Generator().manual_seed(0)

    def tokens(n):
        return torch.randint(4, vocab, (n,), generator=g).tolist()

    return pack_pairs([((1,), tokens(length - 1), tokens(new_tokens)) for _ in range(count)])


def local_bytes(tensor):
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


def measured_step(precision, dp_shard, recompute, monkeypatch, *, head="logits", packed=False):
    """This step's bytes: the model state, what one micro-batch's forward leaves, FSDP's gathered
    weights at their largest, the peak of the forwards and backwards beside the model state (the
    update after them is not the plan's: on the CPU torch's optimizers step tensor by tensor), and
    the peak from the last decoder layer's backward to the end of the one before it."""
    ctx = setup_parallel(1, "cpu", dp_shard=dp_shard, fsdp_alone=precision.mixed)   # as cli.py
    try:
        model = build_tiny_llama(VOCAB, hidden_size=HIDDEN, intermediate_size=MLP, num_layers=LAYERS, num_heads=8,
                                 num_kv_heads=2, max_position_embeddings=LENGTH, attn_implementation="sdpa")
        parallelize_model(model.to(precision.param_dtype), ctx, precision, recompute=recompute)
        scorer = Scorer(ctx, precision, head)
        pairs = PACKED_PAIRS if packed else PAIRS
        trainer = step_trainer(model, scorer, pairs=2 * pairs, micro_batch_size=pairs, lr=1e-4)
        assert scorer.packing == "shared"   # the trainer's default for an SDPA Llama
        batch = (packed_pairs_at_the_bound(VOCAB, LENGTH, NEW_TOKENS, pairs) if packed
                 else full_pairs(VOCAB, LENGTH, pairs))
        micro_batches = [(batch, torch.zeros(2 * pairs), 0)] * 2
        trainer.train_step(micro_batches)   # the first step makes the optimizer's state
        state = [v for s in trainer.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        seen = {}

        def before_update(*args):   # the forwards and backwards are done: their peak is the plan's
            seen.setdefault("gradients", sum(local_bytes(p.grad) for p in model.parameters()))
            seen.setdefault("peak", live.peak)

        trainer.optimizer.register_step_pre_hook(before_update)
        pair_loss = scorer.pair_loss

        def recorded_pair_loss(*args, **kwargs):
            out = pair_loss(*args, **kwargs)
            seen.setdefault("after_forward", live.current)
            return out

        scorer.pair_loss = recorded_pair_loss
        layers, windows = decoder_layers(model), []
        layers[-1].register_full_backward_pre_hook(lambda *args: live.open_window())
        layers[-2].register_full_backward_hook(lambda *args: windows.append(live.close_window()))
        with LiveTensorBytes(list(model.parameters()) + list(model.buffers()) + state) as live:
            # the log-prob ops as the GPU runs them: one Triton kernel with no working memory of its
            # own (the fused head's chunk loop is seen, its op run as plain Python; its CPU-only fp32
            # copies for the d weight product are not: cuBLAS accumulates bf16 into fp32 in place)
            for name in ("logprob_stats", "logprob_grad", "logprob_grad_inplace"):
                monkeypatch.setattr(torch_backend, name, live.one_kernel(getattr(torch_backend, name)))
            monkeypatch.setattr(linear_logprobs, "linear_spin_forward", linear_logprobs.linear_spin_forward._init_fn)
            monkeypatch.setattr(linear_logprobs, "accumulate_product",
                                live.one_kernel(linear_logprobs.accumulate_product))
            trainer.train_step(micro_batches)
        seen.update(gathered=live.resized_peak, parameters=sum(map(local_bytes, model.parameters())),
                    optimizer_state=sum(local_bytes(v) for v in state if v.dim() > 0), layers_peak=max(windows))
        return model.config, seen
    finally:
        teardown_parallel(ctx)


CASES = {   # name: (--dtype, --pure-low-precision, --dp-shard, --recompute, --head, packed pairs)
    "mixed_fsdp": ("bfloat16", False, None, "none", "logits", False),
    "mixed_replicate": ("bfloat16", False, False, "none", "logits", False),
    "mixed_fsdp_full": ("bfloat16", False, None, "full", "logits", False),
    "pure_bf16": ("bfloat16", True, None, "none", "logits", False),
    "fp32": ("float32", False, None, "none", "logits", False),
    "fp32_elementwise": ("float32", False, None, "elementwise", "logits", False),
    "fp32_full": ("float32", False, None, "full", "logits", False),
    "mixed_fsdp_fused": ("bfloat16", False, None, "none", "fused", False),
    "fp32_fused": ("float32", False, None, "none", "fused", False),
    "packed_mixed_fsdp": ("bfloat16", False, None, "none", "logits", True),
    "packed_mixed_fsdp_full": ("bfloat16", False, None, "full", "logits", True),
    "packed_fp32_elementwise": ("float32", False, None, "elementwise", "logits", True),
    "packed_mixed_fsdp_fused": ("bfloat16", False, None, "none", "fused", True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_training_terms_equal_a_measured_step(case, monkeypatch):
    torch.set_num_threads(1)
    dtype, pure, dp_shard, recompute, head, packed = CASES[case]
    precision = Precision(dtype, pure=pure)
    config, got = measured_step(precision, dp_shard, recompute, monkeypatch, head=head, packed=packed)
    batch = (dict(micro_batch_size=PACKED_PAIRS, max_tokens_per_batch=TOKEN_BOUND, packing="shared")
             if packed else dict(micro_batch_size=PAIRS))
    plan = memory_plan(config, nproc=1, tp=1, precision=precision, dp_shard=dp_shard, recompute=recompute,
                       max_length=LENGTH, max_new_tokens=NEW_TOKENS, head=head, attention="sdpa", **batch)
    a, step = plan.activations, plan.step
    if packed:   # the measured batch is the plan's largest: 2 pairs of 1 + 127 + 64 tokens, 127 + 64 head rows
        assert (a.tokens, a.labelled) == (TOKEN_BOUND, PACKED_PAIRS * (LENGTH - 1 + NEW_TOKENS))
    assert (got["parameters"], got["gradients"], got["optimizer_state"]) == (
        plan.parameters, plan.gradients, plan.optimizer_state)
    # a forward leaves the activations (the fused head's chunk and fp32 accumulator freed) and what
    # FSDP keeps gathered (the root; replicate: every unit)
    assert got["after_forward"] == pytest.approx(a.total - a.head_transient + step.gathered_after_forward, rel=0.1)
    assert got["gathered"] == pytest.approx(plan.fsdp_gathered, rel=0.1)
    assert got["peak"] == pytest.approx(plan.training_peak - plan.parameters - plan.optimizer_state, rel=0.1)
    # the last two decoder layers' backward: the layer phase (its working set) and, under FSDP, the
    # top layer's reduce, every gradient there (the second micro-batch)
    phases = step.phases(a)
    layers_phase = max(phases["layer backward"], phases["layer reduce"])
    assert got["layers_peak"] - plan.gradients == pytest.approx(layers_phase, rel=0.1)
    if plan.fsdp:
        assert plan.fsdp_gathered > 0 and plan.fsdp_gradient_buffers > 0
        return
    assert plan.fsdp_gathered == plan.fsdp_gradient_buffers == 0
    # Without FSDP the layer's backward is its peak: what is there beside the activations (the LM
    # head's and the final norm's freed) is the working set.
    assert phases["layer backward"] >= phases["layer reduce"]
    beside = got["layers_peak"] - plan.gradients - (a.total - a.head - a.final_norm)
    assert beside == pytest.approx(plan.backward_working_set, rel=0.1)


@pytest.mark.parametrize("layout", ["shared", "separate"])
@pytest.mark.parametrize("pairs, token_bound", [(1, 0), (3, 0), (3, 9), (3, 14), (3, 20)])
def test_the_planned_micro_batch_is_the_largest_any_batch_can_be(layout, pairs, token_bound):
    """Every micro-batch the trainer can form at --max-length 6, --max-new-tokens 3 (micro_batches.py:
    at most `pairs` pairs within `token_bound` tokens, or one pair alone): the plan's token budget is
    the most tokens of any (pair_batch_tokens), its head rows the most rows (pack_pairs' targets)."""
    length, new_tokens = 6, 3
    kinds = {}   # (tokens, head rows) of each pair: every prompt, gold and generated length, and a
    for p, a in itertools.product(range(1, length), repeat=2):   # generated response equal to the gold
        for g in range(1, min(new_tokens, length - p) + 1):
            if a > length - p:
                continue
            for identical in (False, True) if a == g else (False,):
                prompt, gold = [5] * p, [6] * a
                generated = gold if identical else [7] * g
                packed = pack_pairs([(prompt, gold, generated)], share_prompt=layout == "shared")
                tokens = pair_batch_tokens([Example(tuple(prompt), tuple(gold))], [generated], layout)
                assert tokens == packed.num_tokens
                kinds[tokens, packed.targets.positions.numel()] = None
    most_tokens = most_rows = 0
    for count in range(1, pairs + 1):
        for batch in itertools.combinations_with_replacement(kinds, count):
            tokens = sum(t for t, _ in batch)
            if count == 1 or not token_bound or tokens <= token_bound:
                most_tokens, most_rows = max(most_tokens, tokens), max(most_rows, sum(r for _, r in batch))
    planned = micro_batch(layout, pairs=pairs, max_length=length, max_new_tokens=new_tokens, token_bound=token_bound)
    assert planned.tokens == most_tokens
    # the shared layout's rows are reached; the separate one's (a prompt a response) are fewer
    assert planned.labelled == most_rows if layout == "shared" else planned.labelled >= most_rows
