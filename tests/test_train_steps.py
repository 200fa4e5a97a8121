"""optimizer_step: the update of plain AdamW on the accumulated, clipped gradient; a non-finite
update is refused instead of writing NaN into every weight."""
import copy

import pytest
import torch

from spin_trainer.distributed import ParallelContext
from spin_trainer.steps import make_optimizer, make_scheduler, optimizer_step

CTX = ParallelContext(0, 1, 1, 1, 0, 0, torch.device("cpu"))


def _setup():
    model = torch.nn.Linear(3, 2)
    optimizer = make_optimizer(model, weight_decay=0.0, ctx=CTX)
    return model, optimizer, make_scheduler(optimizer, lambda step: 1e-2)


def test_steps_equal_plain_torch_adamw_on_the_same_gradients():
    # Two micro-batches per step, clipping active, weight decay, a changing learning rate: the
    # weights after each step are those of torch.optim.AdamW fed the gradient of the whole batch.
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    plain = copy.deepcopy(model)
    initial = model.weight.detach().clone()
    optimizer = make_optimizer(model, weight_decay=0.1, ctx=CTX)
    scheduler = make_scheduler(optimizer, lambda step: 1e-2 * (step + 1))
    reference = torch.optim.AdamW(plain.parameters(), lr=1e-2, weight_decay=0.1)
    generator = torch.Generator().manual_seed(1)
    for step in range(3):
        micro_batches = [torch.randn(4, 3, generator=generator), torch.randn(2, 3, generator=generator)]

        def micro_loss(x):
            loss = model(x).pow(2).sum() / 6  # each micro-batch weighted by its share of the 6 rows
            return loss, {"loss": loss.detach()}

        metrics = optimizer_step(model, optimizer, scheduler, micro_batches, micro_loss, ctx=CTX, max_grad_norm=0.05)

        plain.zero_grad()
        loss = plain(torch.cat(micro_batches)).pow(2).sum() / 6
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(plain.parameters(), 0.05)
        assert norm > 0.05  # the clipping is exercised
        for group in reference.param_groups:
            group["lr"] = 1e-2 * (step + 1)
        reference.step()

        assert metrics["loss"] == pytest.approx(loss.item(), rel=1e-6)
        assert metrics["grad_norm"] == pytest.approx(norm.item(), rel=1e-6)
        assert metrics["lr"] == pytest.approx(1e-2 * (step + 1))
        for ours, theirs in zip(model.parameters(), plain.parameters()):
            torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    assert (model.weight - initial).abs().max() > 1e-3  # the steps moved the weights far beyond the tolerance


def test_a_nan_loss_stops_before_the_update():
    model, optimizer, scheduler = _setup()
    before = model.weight.detach().clone()

    def micro_loss(x):
        loss = model(x).sum() * float("nan")
        return loss, {"loss": loss.detach()}

    with pytest.raises(ValueError, match="training diverged.*--dtype float16"):
        optimizer_step(model, optimizer, scheduler, [torch.randn(4, 3)], micro_loss, ctx=CTX,
                       max_grad_norm=1.0)
    assert torch.equal(model.weight, before)
