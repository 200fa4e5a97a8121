"""optimizer_step refuses a non-finite update instead of writing NaN into every weight."""
import pytest
import torch

from spin_trainer.distributed import ParallelContext
from spin_trainer.steps import make_optimizer, make_scheduler, optimizer_step

CTX = ParallelContext(0, 1, 1, 1, 0, 0, torch.device("cpu"))


def _setup():
    model = torch.nn.Linear(3, 2)
    optimizer = make_optimizer(model, weight_decay=0.0, ctx=CTX)
    return model, optimizer, make_scheduler(optimizer, lambda step: 1e-2)


def test_a_finite_step_updates_the_weights():
    model, optimizer, scheduler = _setup()
    before = model.weight.detach().clone()

    def micro_loss(x):
        loss = model(x).pow(2).mean()
        return loss, {"loss": loss.detach()}

    metrics = optimizer_step(model, optimizer, scheduler, [torch.randn(4, 3)], micro_loss, ctx=CTX,
                             max_grad_norm=1.0)
    assert metrics["loss"] > 0 and not torch.equal(model.weight, before)


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
