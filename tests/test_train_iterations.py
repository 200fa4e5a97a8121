"""Across SPIN iterations: the optimizer starts fresh at each iteration (--optimizer-state reset) or
carries its moments (keep, also through a resume between iterations), and the learning rate the
optimizer steps with is Hugging Face's schedule over each iteration or over the run."""
import pytest
import torch
from transformers import get_linear_schedule_with_warmup

from trainer_cases import tiny_setup, train_args

from spin_trainer import cli as train_cli
from spin_trainer import trainer as trainer_module

STEPS = 4   # per iteration: 32 prompts, global batch 8; two iterations


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_setup(str(tmp_path_factory.mktemp("iterations")))


def run_watching_updates(tiny, out, monkeypatch, *extra, stop_between_iterations=False):
    """Runs the loop (optionally stopped after iteration 1 and resumed from its checkpoint); per
    optimizer step: the rate of every parameter group when the optimizer stepped, and around
    iteration 2's first step the weights, gradients and optimizer state."""
    seen = {"lrs": []}
    original = trainer_module.apply_update

    def watched(model, optimizer, scheduler, **kwargs):
        seen["lrs"].append({group["lr"] for group in optimizer.param_groups})
        first_of_second = len(seen["lrs"]) == STEPS + 1
        if first_of_second:
            params = [p for p in model.parameters() if p.requires_grad]
            seen["state_before"] = {id(p): {k: v.clone() for k, v in optimizer.state[p].items()}
                                   for p in params if p in optimizer.state}
            seen["weights_before"] = [p.detach().clone() for p in params]
            seen["grads"] = [p.grad.detach().clone() for p in params]
        grad_norm = original(model, optimizer, scheduler, **kwargs)
        if first_of_second:
            seen["weights_after"] = [p.detach().clone() for p in params]
            seen["state_after"] = [{k: v.clone() for k, v in optimizer.state[p].items()} for p in params]
        return grad_norm

    monkeypatch.setattr(trainer_module, "apply_update", watched)
    args = train_args(*tiny, out, "--max-grad-norm", "0", "--lr-schedule", "linear", "--warmup-ratio", "0.25", *extra)
    if stop_between_iterations:
        train_cli.main(args + ["--max-steps", str(STEPS)])
        args = args + ["--resume"]
    train_cli.main(args)
    return seen


def fresh_adamw_step(seen):
    """(weights, state) after one step of a new torch AdamW from the same weights and gradients."""
    weights = [torch.nn.Parameter(w.clone()) for w in seen["weights_before"]]
    for w, g in zip(weights, seen["grads"]):
        w.grad = g.clone()
    lr = next(iter(seen["lrs"][STEPS]))
    optimizer = torch.optim.AdamW(weights, lr=lr, weight_decay=0.0)
    optimizer.step()
    return [w.detach() for w in weights], [optimizer.state[w] for w in weights]


def hf_linear_rates(lr, steps, warmup):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup, steps)
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_reset_gives_iteration_two_a_fresh_optimizer_and_restarts_the_schedule(tiny, tmp_path, monkeypatch):
    seen = run_watching_updates(tiny, str(tmp_path / "reset"), monkeypatch)   # --optimizer-state reset: default
    assert seen["state_before"] == {}
    weights, states = fresh_adamw_step(seen)
    for ours, fresh in zip(seen["weights_after"], weights):
        torch.testing.assert_close(ours, fresh, rtol=0, atol=0)
    for ours, fresh in zip(seen["state_after"], states):
        assert float(ours["step"]) == 1.0
        torch.testing.assert_close(ours["exp_avg"], fresh["exp_avg"], rtol=0, atol=0)
        torch.testing.assert_close(ours["exp_avg_sq"], fresh["exp_avg_sq"], rtol=0, atol=0)
    # Each iteration its own warm-up (ceil(0.25 · 4) = 1 step, at rate 0) and decay, one rate per step.
    assert all(len(rates) == 1 for rates in seen["lrs"])
    used = [rate for (rate,) in seen["lrs"]]
    assert used == pytest.approx(hf_linear_rates(1e-3, STEPS, 1) * 2, rel=1e-12, abs=0)


def test_keep_carries_the_moments_and_the_schedule_can_span_the_run(tiny, tmp_path, monkeypatch):
    # Stopped after iteration 1 and resumed: the moments come back from its checkpoint.
    seen = run_watching_updates(tiny, str(tmp_path / "keep"), monkeypatch, "--optimizer-state", "keep",
                                "--schedule-span", "run", stop_between_iterations=True)
    assert seen["state_before"] and all(float(s["step"]) == STEPS for s in seen["state_before"].values())
    _, states = fresh_adamw_step(seen)
    assert any(not torch.equal(ours["exp_avg"], fresh["exp_avg"])
               for ours, fresh in zip(seen["state_after"], states))
    # One warm-up (ceil(0.25 · 8) = 2 steps) and one decay over both iterations.
    used = [rate for (rate,) in seen["lrs"]]
    assert used == pytest.approx(hf_linear_rates(1e-3, 2 * STEPS, 2), rel=1e-12, abs=0)
