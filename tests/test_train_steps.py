"""One optimizer step in one process: the update of plain AdamW on the accumulated, clipped gradient;
a non-finite update is refused instead of writing NaN into every weight; the LM head on labelled
positions scores exactly what the full logits score; the logged rewards std is the global batch's
at any micro-batch size; recompute changes no gradient; optimizer-in-backward is refused where
invalid; the optimizer offload around generation reuses one host arena."""
import copy
import math

import pytest
import torch

from trainer_cases import fixed_pairs, pair_items, saved_activation_bytes, step_trainer, tiny_setup, train_args

from spin_trainer import cli as train_cli
from spin_trainer.options import parse_config
from spin_trainer.data import collate_pairs
from spin_trainer.errors import TrainingDiverged, UsageError
from spin_trainer.logprobs import Scorer
from spin_trainer.model import load_model, load_tokenizer
from spin_trainer.optim import StepScheduler, apply_update, make_optimizer
from spin_trainer.parallel.apply import decoder_layers
from spin_trainer.parallel.mesh import ParallelContext
from spin_trainer.parallel.recompute import apply_recompute

CTX = ParallelContext(0, 1, 1, 1, 0, 0, torch.device("cpu"))
SCORER = Scorer(CTX)
PAIRS = 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_setup(str(tmp_path_factory.mktemp("steps")))


@pytest.fixture(scope="module")
def pairs(tiny):
    tokenizer = load_tokenizer(tiny[0])
    return tokenizer, *fixed_pairs(tokenizer, PAIRS)


def _linear_setup():
    model = torch.nn.Linear(3, 2)
    optimizer = make_optimizer(model, lr=1e-2, weight_decay=0.0, ctx=CTX)
    return model, optimizer, StepScheduler(optimizer, lambda step: 1e-2)


def test_steps_equal_plain_torch_adamw_on_the_same_gradients():
    # Two micro-batches per step, clipping active, weight decay, a changing learning rate: the
    # weights after each step are those of torch.optim.AdamW fed the gradient of the whole batch.
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    plain = copy.deepcopy(model)
    initial = model.weight.detach().clone()
    optimizer = make_optimizer(model, lr=1e-2, weight_decay=0.1, ctx=CTX)
    scheduler = StepScheduler(optimizer, lambda step: 1e-2 * (step + 1))
    # The bias takes no weight decay (Hugging Face's rule, as the trainer's).
    reference = torch.optim.AdamW([{"params": [plain.weight]}, {"params": [plain.bias], "weight_decay": 0.0}],
                                  lr=1e-2, weight_decay=0.1)
    generator = torch.Generator().manual_seed(1)
    for step in range(3):
        micro_batches = [torch.randn(4, 3, generator=generator), torch.randn(2, 3, generator=generator)]
        lr = optimizer.param_groups[0]["lr"]
        total = 0.0
        for x in micro_batches:
            loss = model(x).pow(2).sum() / 6  # each micro-batch weighted by its share of the 6 rows
            loss.backward()
            total += loss.item()
        grad_norm = apply_update(model, optimizer, scheduler, max_grad_norm=0.05, loss=total)

        plain.zero_grad()
        loss = plain(torch.cat(micro_batches)).pow(2).sum() / 6
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(plain.parameters(), 0.05)
        assert norm > 0.05  # the clipping is exercised
        for group in reference.param_groups:
            group["lr"] = 1e-2 * (step + 1)
        reference.step()

        assert total == pytest.approx(loss.item(), rel=1e-6)
        assert float(grad_norm) == pytest.approx(norm.item(), rel=1e-6)
        assert lr == pytest.approx(1e-2 * (step + 1))
        for ours, theirs in zip(model.parameters(), plain.parameters()):
            torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    assert (model.weight - initial).abs().max() > 1e-3  # the steps moved the weights far beyond the tolerance


def test_a_nan_loss_stops_before_the_update():
    model, optimizer, scheduler = _linear_setup()
    before = model.weight.detach().clone()

    loss = model(torch.randn(4, 3)).sum() * float("nan")
    loss.backward()
    with pytest.raises(TrainingDiverged, match="training diverged.*no update was made.*float16"):
        apply_update(model, optimizer, scheduler, max_grad_norm=1.0, loss=loss)
    assert torch.equal(model.weight, before)


def test_head_on_labelled_positions_scores_what_the_full_logits_score(tiny, pairs):
    from spin_kernels.loss import sequence_logprobs

    tokenizer, examples, generated = pairs
    model = load_model(tiny[0])
    batch = collate_pairs(examples[:3], generated[:3], tokenizer.pad_token_id)
    calls = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, i, out: calls.append(out.shape))
    with torch.no_grad():
        ours = SCORER.labelled_logps(model, batch)
        full = sequence_logprobs(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits,
                                 batch.labels, batch.loss_mask)
    handle.remove()
    labelled = int(batch.loss_mask.sum())
    # The head ran on the labelled positions only: fewer rows than the batch's positions.
    assert calls[0] == (labelled, model.config.vocab_size) and labelled < batch.labels.numel()
    assert ours.token_logps.shape == (labelled,) and bool((ours.token_logps < 0).all())
    torch.testing.assert_close(ours.sequence_sums(), full, rtol=1e-6, atol=1e-5)


def _spin_step(model_dir, pairs, micro_batch_size, *, recompute="none"):
    tokenizer, examples, generated = pairs
    torch.manual_seed(0)
    model = load_model(model_dir)
    apply_recompute(decoder_layers(model), recompute)
    trainer = step_trainer(model, SCORER, pairs=PAIRS, lr=1e-3, beta=0.5, micro_batch_size=micro_batch_size)
    reference = torch.linspace(-9.0, -5.0, 2 * PAIRS).reshape(PAIRS, 2)
    grads = {}

    def items():
        return pair_items(examples, generated, reference, tokenizer.pad_token_id, start=0, count=PAIRS,
                          micro=micro_batch_size)

    def keep_grads(optimizer, args, kwargs):
        grads.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})

    with torch.no_grad():   # an independent computation: β·(π − ref) from the summed token log-probs
        rewards = torch.cat([0.5 * (SCORER.labelled_logps(model, batch).sequence_sums() - ref)
                             for batch, ref, _ in items()])
    hook = trainer.optimizer.register_step_pre_hook(keep_grads)
    metrics = trainer.train_step(items())
    hook.remove()
    for key in ("step_time", "tokens_per_second"):
        del metrics[key]
    return metrics, grads, rewards


def test_rewards_std_is_the_global_batch_std_at_any_micro_batch_size(tiny, pairs):
    results = {micro: _spin_step(tiny[0], pairs, micro) for micro in (1, 4, 8)}
    rewards = results[8][2]
    assert rewards.shape == (2 * PAIRS,)
    expected = float(rewards.double().std())   # Bessel-corrected, over all 16 rewards of the batch
    assert expected > 0.05
    for micro, (metrics, _, _) in results.items():
        assert abs(metrics["rewards_all_std"] - expected) <= 1e-5 * expected, (micro, metrics["rewards_all_std"])
        assert abs(metrics["rewards_all_mean"] - float(rewards.mean())) <= 1e-6


def _saved_activation_bytes(model_dir, pairs, recompute):
    """Bytes autograd keeps for the backward of one forward (what recompute exists to cut)."""
    tokenizer, examples, generated = pairs
    model = load_model(model_dir)
    apply_recompute(decoder_layers(model), recompute)
    batch = collate_pairs(examples[:4], generated[:4], tokenizer.pad_token_id)
    return saved_activation_bytes(model, lambda: SCORER.labelled_logps(model, batch).sequence_sums().sum())


def test_recompute_keeps_fewer_activations(tiny, pairs):
    plain, elementwise, full = (_saved_activation_bytes(tiny[0], pairs, mode) for mode in ("none", "elementwise", "full"))
    assert full < elementwise < plain


@pytest.mark.parametrize("mode", ["elementwise", "full"])
def test_recompute_changes_no_gradient(tiny, pairs, mode):
    metrics, grads, _ = _spin_step(tiny[0], pairs, 4, recompute=mode)
    plain_metrics, plain_grads, _ = _spin_step(tiny[0], pairs, 4)
    assert grads.keys() == plain_grads.keys() and len(grads) > 10
    for name, grad in plain_grads.items():
        assert torch.equal(grads[name], grad), name
    assert metrics == plain_metrics


@pytest.mark.parametrize("extra, expected", [
    (["--max-grad-norm", "0"], "--optimizer-in-backward needs one micro-batch per step on each rank, but "
                               "--global-batch-size 8 = 2 x --micro-batch-size 4"),
    (["--micro-batch-size", "8"], "--optimizer-in-backward cannot clip"),
])
def test_optimizer_in_backward_is_refused_before_any_model_is_loaded(tiny, tmp_path, no_model_load, extra,
                                                                    expected):
    with pytest.raises(UsageError) as info:
        train_cli.main(train_args(*tiny, str(tmp_path / "run"), "--optimizer-in-backward", *extra))
    assert expected in str(info.value) and "drop --optimizer-in-backward" in str(info.value)


def test_optimizer_in_backward_is_refused_with_replicated_data_parallelism():
    config = parse_config(["--micro-batch-size", "4", "--global-batch-size", "8", "--max-grad-norm", "0",
                           "--optimizer-in-backward"])
    with pytest.raises(UsageError, match="--optimizer-in-backward with --no-dp-shard is not supported"):
        config.check_layout(2, False, 32)
    config.check_layout(2, True, 32)


def test_parked_optimizer_reuses_one_host_arena_and_restores_the_state_bit_for_bit():
    from spin_trainer.generation.rollouts import ParkedOptimizer

    model = torch.nn.Linear(5, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    parked = ParkedOptimizer(optimizer)
    with parked.parked():   # no state before the first step: nothing to move
        assert parked.record is None
    arenas = []
    for _ in range(3):
        model(torch.randn(4, 5)).square().sum().backward()
        optimizer.step()
        expected = {k: v.clone() for k, v in optimizer.state[model.weight].items()}
        with parked.parked():
            arena = parked.record.bank.arena   # the state now lives in views of the host arena
            assert optimizer.state[model.weight]["exp_avg"].untyped_storage().data_ptr() == \
                arena.untyped_storage().data_ptr()
            arenas.append(arena)
        for key, value in expected.items():
            assert torch.equal(optimizer.state[model.weight][key], value), key
    assert arenas[0] is arenas[1] is arenas[2]
