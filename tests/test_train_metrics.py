"""Every number a step logs, recomputed from scratch: the policy's weights from the checkpoint before
the step, the reference policy θ_t (the starting model in iteration 1, the end of iteration 1 in
iteration 2), the pairs the checkpoint holds, plain Hugging Face forwards in float64. A flipped sign,
a pair matched with another prompt's generation, or a reference one iteration stale changes them."""
import math
import os

import pytest
import torch

from trainer_cases import independent_logps, loop_data, metric_records, tiny_setup, train_args

from spin_trainer import cli as train_cli
from spin_trainer.checkpoint import load_train_state
from spin_trainer.model import load_model
from spin_trainer.optim import epoch_order
from spin_trainer.parallel.mesh import ParallelContext

BETA, BATCH, SEED = 0.5, 8, 0
CTX = ParallelContext(0, 1, 1, 1, 0, 0, torch.device("cpu"))


@pytest.fixture(scope="module", params=["precompute", "swap"])
def run(request, tmp_path_factory):
    """A run whose reference log-probs are cached at each iteration's start, or computed per batch
    from θ_t swapped in."""
    root = str(tmp_path_factory.mktemp("metrics"))
    tiny = tiny_setup(root)
    out = os.path.join(root, "run")
    # 32 prompts: iteration 1 has 4 steps; iteration 2 mixes in 8 of iteration 1's pairs (5 steps).
    train_cli.main(train_args(*tiny, out, "--beta", str(BETA), "--mix-previous", "0.25", "--save-every", "1",
                              "--keep", "20", "--lr", "3e-3", "--seed", str(SEED), "--reference", request.param))
    return tiny[0], out


def weights_at(model_dir, out, step):
    """The policy after optimizer step `step` (0: the starting model)."""
    model = load_model(model_dir)
    if step:
        path = os.path.join(out, "checkpoints", "spin", f"step-{step:08d}", "model")
        load_train_state(path, model, torch.optim.AdamW(model.parameters()), CTX)
    return model.eval()


def recomputed(model_dir, out, step, iteration, step_in_epoch, theta_t_step):
    """The step's metrics from its pairs, the policy before it and θ_t, without trainer code."""
    data = loop_data(out, step - 1)["data"]
    policy, reference = weights_at(model_dir, out, step - 1), weights_at(model_dir, out, theta_t_step)
    order = epoch_order(len(data["examples"]), SEED, iteration, 0)
    rewards = {"actual": [], "generated": []}
    for k in order[step_in_epoch * BATCH:(step_in_epoch + 1) * BATCH]:
        example, generated = data["examples"][k], data["generated"][k]
        for kind, response in (("actual", example.response_ids), ("generated", generated)):
            with torch.no_grad():
                pi = float(independent_logps(policy, example.prompt_ids, response))
                ref = float(independent_logps(reference, example.prompt_ids, response))
            rewards[kind].append(BETA * (pi - ref))
    margins = [a - g for a, g in zip(rewards["actual"], rewards["generated"])]
    every = torch.tensor(rewards["actual"] + rewards["generated"], dtype=torch.float64)
    return {"acc": sum(m > 0 for m in margins) / BATCH, "margin_mean": sum(margins) / BATCH,
            "rewards_actual_mean": sum(rewards["actual"]) / BATCH,
            "rewards_generated_mean": sum(rewards["generated"]) / BATCH,
            "rewards_all_std": float(every.std()),
            "loss": sum(math.log1p(math.exp(-m)) for m in margins) / BATCH}


@pytest.mark.parametrize("step, iteration, step_in_epoch, theta_t_step", [
    (3, 0, 2, 0),   # iteration 1: θ_t is the starting model
    (7, 1, 2, 4),   # iteration 2: θ_t is the policy at the end of iteration 1 (step 4), not the start
])
def test_a_steps_logged_metrics_equal_an_independent_recomputation(run, step, iteration, step_in_epoch,
                                                                   theta_t_step):
    model_dir, out = run
    record = next(r for r in metric_records(out, "train") if r["step"] == step)
    expected = recomputed(model_dir, out, step, iteration, step_in_epoch, theta_t_step)
    assert abs(expected["margin_mean"]) > 1e-3 and 0 < expected["acc"] < 1   # far from the degenerate start
    for name, value in expected.items():
        assert record[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name


def test_an_iteration_starts_at_its_own_reference(run):
    """At iteration 2's first step the policy is θ_1 and so is the reference: every reward is 0."""
    _, out = run
    first = next(r for r in metric_records(out, "train") if r["step"] == 5)
    assert first["iteration"] == 2
    for name in ("rewards_actual_mean", "rewards_generated_mean", "margin_mean", "rewards_all_std"):
        assert abs(first[name]) < 1e-6, name
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_mixed_pairs_keep_their_own_generations(run):
    """Iteration 2's pairs from iteration 1 are iteration 1's pairs, each prompt with its own response."""
    _, out = run
    previous = loop_data(out, 3)["data"]
    pairs = {(tuple(e.prompt_ids), tuple(e.response_ids), tuple(g)) for e, g in zip(previous["examples"], previous["generated"])}
    current = loop_data(out, 5)["data"]
    assert len(current["examples"]) == 40
    mixed = list(zip(current["examples"][32:], current["generated"][32:]))
    assert all((tuple(e.prompt_ids), tuple(e.response_ids), tuple(g)) in pairs for e, g in mixed)
    # Iteration 1's pairs are not all alike: a shifted pairing would not be found among them.
    assert len({tuple(g) for _, g in mixed}) > 1
