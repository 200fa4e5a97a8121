"""The reference modes: each gives θ_t's log-probs after the policy has moved on, keeps its weights
across iterations in the same storage, and round-trips θ_t through state() / load_state()."""
import pytest
import torch

from trainer_cases import arith_records, tiny_setup, train_args

from spin_trainer import cli as train_cli

from spin_trainer.data import Example, collate_pairs
from spin_trainer.logprobs import Scorer
from spin_trainer.model import create_default_model, load_model, load_tokenizer
from spin_trainer.parallel.mesh import ParallelContext
from spin_trainer.ref_policy import make_reference

SCORER = Scorer(ParallelContext(0, 1, 1, 1, 0, 0, torch.device("cpu")))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return create_default_model(str(tmp_path_factory.mktemp("ref") / "model"), hidden_size=32, intermediate_size=64)


def pair_batch(tokenizer):
    examples, generated = [], []
    for record in arith_records("train", 3):
        prompt = [tokenizer.bos_token_id] + tokenizer(record["prompt"], add_special_tokens=False)["input_ids"]
        response = tokenizer(record["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        examples.append(Example(tuple(prompt), tuple(response)))
        generated.append(response[:1])
    return collate_pairs(examples, generated, tokenizer.pad_token_id)


def perturb(model, scale):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)


def snapshot(model):
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


@pytest.mark.parametrize("mode", ["swap", "resident", "streamed"])
def test_reference_holds_theta_t_while_the_policy_moves(model_dir, mode):
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, attention="eager")
    batch = pair_batch(tokenizer)
    reference = make_reference(mode, model, SCORER, generate_every_epoch=False)
    torch.manual_seed(0)
    for _ in range(2):   # two iterations: θ_t is refreshed in place from the policy
        reference.begin_iteration()
        theta_t, expected = snapshot(model), SCORER.sequence_logps(model, batch)
        storage = reference.bank.arena.data_ptr() if mode != "resident" else id(reference.copy)
        perturb(model, 0.05)
        policy = snapshot(model)
        got = reference.batch_logps(batch)
        if mode == "streamed":   # the full logits' matmul: other shapes, the same numbers to float rounding
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-5)
        else:
            assert torch.equal(got, expected)
        assert not torch.allclose(SCORER.sequence_logps(model, batch), expected)   # the policy did move
        for name, tensor in snapshot(model).items():   # ... and is its own again after the reference forward
            assert torch.equal(tensor, policy[name]), name
        with reference.weights() as module:
            for name, tensor in module.state_dict().items():
                assert torch.equal(tensor, theta_t[name]), name
    # The second iteration reused the first one's storage (no new pinned arena, no new copy).
    assert storage == (reference.bank.arena.data_ptr() if mode != "resident" else id(reference.copy))


@pytest.mark.parametrize("mode", ["precompute", "swap", "resident"])
def test_state_round_trip_into_a_fresh_reference(model_dir, mode):
    model = load_model(model_dir, attention="eager")
    reference = make_reference(mode, model, SCORER, generate_every_epoch=True)
    reference.begin_iteration()
    theta_t = snapshot(model)
    with reference.state() as module:
        saved = snapshot(module)
    perturb(model, 0.05)
    policy = snapshot(model)

    fresh_model = load_model(model_dir, attention="eager")
    perturb(fresh_model, 0.05)
    fresh_policy = snapshot(fresh_model)
    fresh = make_reference(mode, fresh_model, SCORER, generate_every_epoch=True)
    with fresh.load_state() as module:
        module.load_state_dict(saved)
    with fresh.weights() as module:
        for name, tensor in module.state_dict().items():
            assert torch.equal(tensor, theta_t[name]), name
    for name, tensor in snapshot(fresh_model).items():   # loading θ_t left the policy alone
        assert torch.equal(tensor, fresh_policy[name]), name
    assert not torch.equal(policy["lm_head.weight"], theta_t["lm_head.weight"])


def test_precompute_keeps_no_weights(model_dir):
    model = load_model(model_dir, attention="eager")
    reference = make_reference("precompute", model, SCORER, generate_every_epoch=False)
    reference.begin_iteration()
    assert reference.precomputes_logps
    with reference.state() as module:
        assert module is None


def test_the_loop_pins_one_bank_for_the_whole_run(tmp_path, monkeypatch):
    """Two iterations in swap mode allocate one WeightBank; the next iterations refill it."""
    from spin_kernels.swap import WeightBank

    allocated = []
    original = WeightBank.from_module.__func__

    def counting(cls, module, **kwargs):
        allocated.append(module)
        return original(cls, module, **kwargs)

    monkeypatch.setattr(WeightBank, "from_module", classmethod(counting))
    setup = tiny_setup(str(tmp_path))
    rows = train_cli.main(train_args(*setup, str(tmp_path / "run"), "--reference", "swap", "--greedy"))
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert len(allocated) == 1


@pytest.mark.parametrize("extra", [(), ("--no-pack-pairs", "--max-tokens-per-batch", "56")])
def test_the_reference_is_precomputed_in_the_first_epochs_own_micro_batches(tmp_path, monkeypatch, extra):
    """Every micro-batch the first epoch trains on was scored, as it is, for the iteration's
    reference cache: on a GPU a row's log-probs may round otherwise in a batch of another shape, and
    π − ref is exactly 0 at θ_t only if the reference saw the step's own batches."""
    setup = tiny_setup(str(tmp_path))
    scored, trained = [], []
    original_logps, original_loss = Scorer.sequence_logps, Scorer.pair_loss

    def sequence_logps(self, model, batch):
        scored.append(batch.input_ids.tolist())
        return original_logps(self, model, batch)

    def pair_loss(self, model, batch, ref_logps, **kwargs):
        if torch.is_grad_enabled():
            trained.append(batch.input_ids.tolist())
        return original_loss(self, model, batch, ref_logps, **kwargs)

    monkeypatch.setattr(Scorer, "sequence_logps", sequence_logps)
    monkeypatch.setattr(Scorer, "pair_loss", pair_loss)
    train_cli.main(train_args(*setup, str(tmp_path / "run"), "--iterations", "1", *extra))
    assert len(trained) >= 8   # 4 steps of 32 pairs in global batches of 8, 2 or more micro-batches each
    assert all(batch in scored for batch in trained)


@pytest.mark.parametrize("head", ["logits", "fused"])
def test_streamed_reference_starts_each_iteration_with_a_margin_of_exactly_zero(tmp_path, head):
    """θ_t's layers streamed from host memory, then the policy's own head arithmetic: at each
    iteration's first step every pair's β·(π − ref) is 0 to the bit, as in the other modes."""
    from trainer_cases import metric_records

    out = str(tmp_path / "run")
    train_cli.main(train_args(*tiny_setup(str(tmp_path)), out, "--reference", "streamed", "--head", head,
                              "--lr", "5e-3"))
    records = metric_records(out, "train")
    firsts = [(r["iteration"], r["margin_mean"], r["rewards_all_std"]) for r in records if r["step"] in (1, 5)]
    assert firsts == [(1, 0.0, 0.0), (2, 0.0, 0.0)]
    assert records[1]["rewards_all_std"] > 0   # the steps after it do move the policy away from θ_t
