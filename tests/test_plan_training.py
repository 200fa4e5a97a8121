"""`--plan`'s training-step terms against a real step of the trainer's own code, within 10%: one
process, the model parallelized as cli.py does it (in mixed precision FSDP's `fully_shard`, or
`replicate` with --no-dp-shard, on a data-parallel axis of one rank), SpinTrainer.train_step over
two micro-batches (from the second one on every gradient is there, as the plan counts them), the
bytes measured as the tensors the operators and FSDP allocate (tests/live_bytes.py), the update
multi-tensor as on CUDA.

The shapes make every term visible: weights, activations and FSDP's copies of a similar size; a
16x vocabulary makes the LM head's gradient a large part of the loss's backward. Every batch is
the plan's largest: padded, a pair of full rows (one prompt token, no padding: 2 rows x 128
tokens, all but the first of each row labelled); packed, pairs at the bound of
plan/micro_batch.py (one prompt token, a gold response to --max-length, a generated one of
--max-new-tokens), as many as the token budget holds. Besides the peak, each phase of the plan is
measured on its own (plan/training.py), and in a layer's backward the working set beside the
rest, so a term wrong by a tenth of the working set fails."""
import itertools

import pytest
import torch
import torch.distributed as dist

from live_bytes import LiveTensorBytes
from spin_kernels.loss import torch_backend
from trainer_cases import step_trainer

from spin_kernels.loss.ops import linear_logprobs
from spin_trainer.data import Example, collate_pairs
from spin_trainer.logprobs import Scorer
from spin_trainer.packed_scoring import pair_batch_tokens
from spin_trainer.packing import pack_pairs
from spin_trainer.model import build_tiny_llama
from spin_trainer.optim import make_optimizer
from spin_trainer.parallel.apply import decoder_layers, parallelize_model
from spin_trainer.parallel.mesh import ParallelContext, setup_parallel, teardown_parallel
from spin_trainer.parallel.precision import Precision
from spin_trainer.plan.memory import memory_plan
from spin_trainer.plan.micro_batch import micro_batch

# (vocabulary, hidden, MLP, decoder layers): weights, activations and FSDP's copies of a similar size;
# a vocabulary 16x larger (the LM head's gradient a large part of the loss's backward)
SHAPES = {"base": (512, 256, 704, 3), "vocab": (8192, 256, 704, 2)}
LENGTH, PAIRS = 128, 1
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


def measured_step(case, monkeypatch):
    """The bytes of a step of `case` (a CASES entry): the model state, what one micro-batch's forward
    leaves, FSDP's gathered weights at their largest, the whole step's peak beside the model state,
    and each phase's peak beside it (the second micro-batch's, every gradient there): the loss's
    backward, a decoder layer's backward to the end of its MLP's (the top two layers'), the top two
    layers' backward with the top one's reduce, the end of the backward (from the embeddings'
    backward on) and the optimizer's update, multi-tensor as CUDA runs it."""
    vocab, hidden, mlp, layer_count = SHAPES[case["shape"]]
    precision = Precision(case["dtype"], pure=case["pure"])
    ctx = setup_parallel(1, "cpu", dp_shard=case["dp_shard"], fsdp_alone=precision.mixed)   # as cli.py
    try:
        model = build_tiny_llama(vocab, hidden_size=hidden, intermediate_size=mlp, num_layers=layer_count,
                                 num_heads=8, num_kv_heads=2, max_position_embeddings=LENGTH,
                                 attn_implementation="sdpa")
        parallelize_model(model.to(precision.param_dtype), ctx, precision, recompute=case["recompute"])
        scorer = Scorer(ctx, precision, case["head"])
        pairs = PACKED_PAIRS if case["packed"] else PAIRS
        trainer = step_trainer(model, scorer, pairs=2 * pairs * ctx.dp_size, micro_batch_size=pairs, lr=1e-4)
        assert scorer.packing == "shared"   # the trainer's default for an SDPA Llama
        batch = (packed_pairs_at_the_bound(vocab, LENGTH, NEW_TOKENS, pairs) if case["packed"]
                 else full_pairs(vocab, LENGTH, pairs))
        micro_batches = [(batch, torch.zeros(2 * pairs), 0)] * 2
        trainer.train_step(micro_batches)   # the first step makes the optimizer's state
        for group in trainer.optimizer.param_groups:   # CUDA's default; the CPU's steps tensor by tensor
            group["foreach"] = True
        state = [v for s in trainer.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        seen, phases = {}, {}

        def window(opens=(), closes=()):   # a hook that ends and starts phases
            def hook(*args):
                for name in closes:
                    phases.setdefault(name, []).append(live.close_window(name))
                for name in opens:
                    live.open_window(name)
            return hook

        def recorded_pair_loss(*args, **kwargs):
            out = pair_loss(*args, **kwargs)
            seen.setdefault("after_forward", live.current)
            live.open_window("loss backward")
            # gathered weights from here on: the backward's (in the forward FSDP keeps a unit's
            # all-gather output to the next unit's copy-out, beside fewer activations)
            live.resized_peak = live.resized
            return out

        pair_loss, scorer.pair_loss = scorer.pair_loss, recorded_pair_loss
        layers = decoder_layers(model)
        layers[-1].register_full_backward_pre_hook(window(closes=["loss backward"], opens=["layers"]))
        layers[-2].register_full_backward_hook(window(closes=["layers"]))
        for layer in layers[-2:]:
            layer.register_full_backward_pre_hook(window(opens=["layer backward"]))
            layer.mlp.register_full_backward_hook(window(closes=["layer backward"]))

        def at_embeddings_gradient(module, args, out):   # after the bottom layer's reduce: the root's own
            out.register_hook(window(opens=["end of backward"]))

        model.get_input_embeddings().register_forward_hook(at_embeddings_gradient)
        backward_done = window(closes=["end of backward"], opens=["optimizer step"])

        def before_update(*args):
            seen["gradients"] = sum(local_bytes(p.grad) for p in model.parameters())
            backward_done()

        trainer.optimizer.register_step_pre_hook(before_update)
        trainer.optimizer.register_step_post_hook(window(closes=["optimizer step"]))
        with LiveTensorBytes(list(model.parameters()) + list(model.buffers()) + state) as live:
            # the log-prob ops as the GPU runs them: one Triton kernel with no working memory of its
            # own (the fused head's chunk loop is seen, its op run as plain Python; its CPU-only fp32
            # copies for the d weight product are not: cuBLAS accumulates bf16 into fp32 in place)
            for name in ("logprob_stats", "logprob_grad", "logprob_grad_inplace"):
                monkeypatch.setattr(torch_backend, name, live.one_kernel(getattr(torch_backend, name)))
            monkeypatch.setattr(linear_logprobs, "linear_spin_forward", linear_logprobs.linear_spin_forward._init_fn)
            monkeypatch.setattr(linear_logprobs, "accumulate_product",
                                live.one_kernel(linear_logprobs.accumulate_product))
            # FSDP's collectives (two ranks) as NCCL runs them, into their output (gloo reduces a copy
            # of its input); an all-gather's output is the weights FSDP gathers (prefetches)
            for name in ("all_gather_single", "all_gather_into_tensor", "reduce_scatter_single",
                         "reduce_scatter_tensor"):
                if hasattr(dist, name):
                    wrap = live.all_gather if name.startswith("all_gather") else live.one_kernel
                    monkeypatch.setattr(dist, name, wrap(getattr(dist, name)))
            trainer.train_step(micro_batches)
        seen.update({name: max(peaks) - seen["gradients"] for name, peaks in phases.items()})
        seen.update(gathered=live.resized_peak, peak=live.peak - seen["gradients"],
                    parameters=sum(map(local_bytes, model.parameters())),
                    optimizer_state=sum(local_bytes(v) for v in state if v.dim() > 0))
        return model.config, seen
    finally:
        teardown_parallel(ctx)


def planned_step(case, config, nproc=1, rank=0):
    """The plan of `case`'s step (a CASES entry) on `rank` of `nproc` data-parallel processes."""
    batch = (dict(micro_batch_size=PACKED_PAIRS, max_tokens_per_batch=TOKEN_BOUND, packing="shared")
             if case["packed"] else dict(micro_batch_size=PAIRS))
    return memory_plan(config, nproc=nproc, tp=1, precision=Precision(case["dtype"], pure=case["pure"]),
                       dp_shard=case["dp_shard"], recompute=case["recompute"], max_length=LENGTH,
                       max_new_tokens=NEW_TOKENS, head=case["head"], attention="sdpa", rank=rank, **batch)


def step_case(dtype="bfloat16", pure=False, dp_shard=None, recompute="none", head="logits", packed=False, shape="base"):
    """A measured step: --dtype, --pure-low-precision, --dp-shard, --recompute, --head, packed pairs
    or padded rows, the model's SHAPES entry."""
    return dict(dtype=dtype, pure=pure, dp_shard=dp_shard, recompute=recompute, head=head, packed=packed, shape=shape)


CASES = {
    "mixed_fsdp": step_case(),
    "mixed_replicate": step_case(dp_shard=False),
    "mixed_fsdp_full": step_case(recompute="full"),
    "pure_bf16": step_case(pure=True),
    "fp32": step_case(dtype="float32"),
    "fp32_elementwise": step_case(dtype="float32", recompute="elementwise"),
    "fp32_full": step_case(dtype="float32", recompute="full"),
    "mixed_fsdp_fused": step_case(head="fused"),
    "fp32_fused": step_case(dtype="float32", head="fused"),
    "packed_mixed_fsdp": step_case(packed=True),
    "packed_mixed_fsdp_full": step_case(recompute="full", packed=True),
    "packed_fp32_elementwise": step_case(dtype="float32", recompute="elementwise", packed=True),
    "packed_mixed_fsdp_fused": step_case(head="fused", packed=True),
    # the LM head's gradient a sixth of the loss's backward or more (under FSDP the root's reduce the peak)
    "vocab_mixed_fsdp": step_case(shape="vocab"),
    "vocab_mixed_replicate": step_case(dp_shard=False, shape="vocab"),
    "vocab_mixed_fsdp_fused": step_case(head="fused", shape="vocab"),
    "vocab_fp32": step_case(dtype="float32", shape="vocab"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_training_terms_equal_a_measured_step(name, monkeypatch):
    torch.set_num_threads(1)
    case = CASES[name]
    config, got = measured_step(case, monkeypatch)
    plan = planned_step(case, config)
    if case["packed"]:   # the measured batch is the plan's largest: 2 pairs of 1 + 127 + 64 tokens, 127 + 64 head rows
        assert (plan.activations.tokens, plan.activations.labelled) == (
            TOKEN_BOUND, PACKED_PAIRS * (LENGTH - 1 + NEW_TOKENS))
    assert plan.fsdp == (plan.fsdp_gathered > 0 and plan.fsdp_gradient_buffers > 0)
    assert_step_equals_plan(case, got, plan)


def assert_step_equals_plan(case, got, plan):
    """measured_step's bytes against the plan's terms, within 10%."""
    a, step = plan.activations, plan.step
    assert (got["parameters"], got["gradients"], got["optimizer_state"]) == (
        plan.parameters, plan.gradients, plan.optimizer_state)
    # a forward leaves the activations (the fused head's chunk and fp32 accumulator freed) and what
    # FSDP keeps gathered (the root; replicate: every unit)
    assert got["after_forward"] == pytest.approx(a.total - a.head_transient + step.gathered_after_forward, rel=0.1)
    assert got["gathered"] == pytest.approx(plan.fsdp_gathered, rel=0.1)
    assert got["peak"] == pytest.approx(plan.training_peak - plan.parameters - plan.optimizer_state - plan.gradients,
                                        rel=0.1)
    phases = step.phases(a)
    # the phases, each on its own: the top layers' backward with the top one's reduce; a layer's
    # backward, whose part beside the rest (saved activations less the LM head's and the final
    # norm's, FSDP's copies and buffers) is the working set (so a term of the rest that is wrong by
    # a tenth of the working set fails here too: FSDP's down_proj gradient, the final norm's
    # activations, the LM head's gradient); the optimizer's update (its temporaries alone)
    assert got["layers"] == pytest.approx(max(phases["layer backward"], phases["layer reduce"]), rel=0.1)
    beside = got["layer backward"] - (phases["layer backward"] - step.working_set)
    assert beside == pytest.approx(step.working_set, rel=0.1)
    assert got["optimizer step"] == pytest.approx(phases["optimizer step"], rel=0.1)
    if plan.fsdp:   # without FSDP the embeddings' gradient is formed, then added: less than the loss's backward
        assert got["end of backward"] == pytest.approx(phases["end of backward"], rel=0.1)
    if case["shape"] == "vocab":   # elsewhere the final norm's fp32 backward (not counted) can set it
        assert got["loss backward"] == pytest.approx(phases["loss backward"], rel=0.1)


@pytest.mark.parametrize("name, weight_decay, in_backward", [
    ("adamw", 0.1, False), ("rmsprop", 0.0, False), ("rmsprop", 0.1, False), ("adamw", 0.1, True),
    ("rmsprop", 0.1, True)])
def test_update_temporaries_equal_a_measured_update(name, weight_decay, in_backward):
    """The trainer's optimizer stepped as on CUDA: multi-tensor (RMSprop with weight decay adds the
    decayed gradients to the square root), a parameter group at a time; in the backward AdamW fused
    (nothing), RMSprop one parameter's. Measured beside the parameters, gradients and state."""
    model = build_tiny_llama(512, hidden_size=256, intermediate_size=704, num_layers=2)
    optimizer = make_optimizer(model, ctx=ParallelContext(0, 1, 1, 1, 0, 0, torch.device("cpu")), lr=1e-3, name=name,
                               weight_decay=weight_decay, in_backward=in_backward)
    for group in optimizer.param_groups:   # CUDA's choices; the CPU's default steps tensor by tensor
        group["fused" if in_backward and name == "adamw" else "foreach"] = True
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()   # makes the state
    state = [v for s in optimizer.state.values() for v in s.values()]
    with LiveTensorBytes([*model.parameters(), *(p.grad for p in model.parameters()), *state]) as live:
        optimizer.step()
    plan = memory_plan(model.config, nproc=1, tp=1, precision=Precision("float32"),
                       optimizer_options=dict(name=name, weight_decay=weight_decay, in_backward=in_backward))
    assert live.peak == pytest.approx(plan.optimizer_update, rel=0.1)
    assert (plan.optimizer_update == 0) == (in_backward and name == "adamw")


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
