"""`--plan`'s training-step terms against a real step of the trainer's own code, within 10%: one
process, the model parallelized as cli.py does it (in mixed precision FSDP's `fully_shard`, or
`replicate` with --no-dp-shard, on a data-parallel axis of one rank), SpinTrainer.train_step over
two micro-batches (from the second one on every gradient is there, as the plan counts them), the
bytes measured as the tensors the operators and FSDP allocate (tests/live_bytes.py).

The shapes make every term visible: weights, activations and FSDP's copies of a similar size.
Every row is full (one prompt token, no padding), so the batch is the plan's: 2 rows x 128 tokens,
all but the first of each row labelled."""
import pytest
import torch

from live_bytes import LiveTensorBytes
from spin_kernels.loss import torch_backend
from trainer_cases import step_trainer

from spin_trainer.data import Example, collate_pairs
from spin_trainer.logprobs import Scorer
from spin_trainer.model import build_tiny_llama
from spin_trainer.parallel.apply import parallelize_model
from spin_trainer.parallel.mesh import setup_parallel, teardown_parallel
from spin_trainer.parallel.precision import Precision
from spin_trainer.plan.memory import memory_plan

VOCAB, HIDDEN, MLP, LAYERS, LENGTH, PAIRS = 512, 256, 704, 3, 128, 1


def full_pairs(vocab, length, count):
    g = torch.Generator().manual_seed(0)

    def response():
        return tuple(torch.randint(4, vocab, (length - 1,), generator=g).tolist())

    examples = [Example((1,), response()) for _ in range(count)]
    return collate_pairs(examples, [response() for _ in range(count)], 0)


def local_bytes(tensor):
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


def measured_step(precision, dp_shard, recompute, monkeypatch):
    """This step's bytes: the model state, what one micro-batch's forward leaves, FSDP's gathered
    weights at their largest, and the peak of the forwards and backwards beside the model state (the
    update after them is not the plan's: on the CPU torch's optimizers step tensor by tensor)."""
    ctx = setup_parallel(1, "cpu", dp_shard=dp_shard, fsdp_alone=precision.mixed)   # as cli.py
    try:
        model = build_tiny_llama(VOCAB, hidden_size=HIDDEN, intermediate_size=MLP, num_layers=LAYERS, num_heads=8,
                                 num_kv_heads=2, max_position_embeddings=LENGTH, attn_implementation="sdpa")
        parallelize_model(model.to(precision.param_dtype), ctx, precision, recompute=recompute)
        scorer = Scorer(ctx, precision, "logits")
        trainer = step_trainer(model, scorer, pairs=2 * PAIRS, micro_batch_size=PAIRS, lr=1e-4)
        batch = full_pairs(VOCAB, LENGTH, PAIRS)
        micro_batches = [(batch, torch.zeros(2 * PAIRS), 0)] * 2
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
        with LiveTensorBytes(list(model.parameters()) + list(model.buffers()) + state) as live:
            # the log-prob op as the GPU runs it: one Triton kernel with no working memory of its own
            for name in ("logprob_stats", "logprob_grad"):
                monkeypatch.setattr(torch_backend, name, live.one_kernel(getattr(torch_backend, name)))
            trainer.train_step(micro_batches)
        seen.update(gathered=live.resized_peak, parameters=sum(map(local_bytes, model.parameters())),
                    optimizer_state=sum(local_bytes(v) for v in state if v.dim() > 0))
        return model.config, seen
    finally:
        teardown_parallel(ctx)


CASES = {   # name: (--dtype, --pure-low-precision, --dp-shard, --recompute)
    "mixed_fsdp": ("bfloat16", False, None, "none"),
    "mixed_replicate": ("bfloat16", False, False, "none"),
    "mixed_fsdp_full": ("bfloat16", False, None, "full"),
    "pure_bf16": ("bfloat16", True, None, "none"),
    "fp32": ("float32", False, None, "none"),
    "fp32_elementwise": ("float32", False, None, "elementwise"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_training_terms_equal_a_measured_step(case, monkeypatch):
    torch.set_num_threads(1)
    dtype, pure, dp_shard, recompute = CASES[case]
    precision = Precision(dtype, pure=pure)
    config, got = measured_step(precision, dp_shard, recompute, monkeypatch)
    plan = memory_plan(config, nproc=1, tp=1, precision=precision, dp_shard=dp_shard, recompute=recompute,
                       micro_batch_size=PAIRS, max_length=LENGTH, head="logits")
    a, step = plan.activations, plan.step
    assert (got["parameters"], got["gradients"], got["optimizer_state"]) == (
        plan.parameters, plan.gradients, plan.optimizer_state)
    # a forward leaves the activations and what FSDP keeps gathered (the root; replicate: every unit)
    assert got["after_forward"] == pytest.approx(a.total + step.gathered_after_forward, rel=0.1)
    assert got["gathered"] == pytest.approx(plan.fsdp_gathered, rel=0.1)
    assert got["peak"] == pytest.approx(plan.training_peak - plan.parameters - plan.optimizer_state, rel=0.1)
    if plan.fsdp:
        assert plan.fsdp_gathered > 0 and plan.fsdp_gradient_buffers > 0
        return
    assert plan.fsdp_gathered == plan.fsdp_gradient_buffers == 0
    # Without FSDP the peak beside the activations (the LM head's freed) is at most the working set.
    # Not yet within 10%: the CPU step measures 0.82 of the formula in pure bf16, 0.6 in fp32
    # (the formula's three [n, I] gradients are not all live at once; which ones is still open).
    assert got["peak"] - plan.gradients - (a.total - a.head) <= plan.backward_working_set
