"""spin_trainer.generation.sampling: the noise is a pure function of (seed, example, step, vocab id), computed
exactly as a uint32 reference computes it, and the draws it makes follow the distribution."""
import numpy as np
import pytest
import torch

from spin_trainer.generation.sampling import MASK32, SamplingConfig, mix32, sample_next_tokens, uniform_noise


def lowbias32_reference(x: np.ndarray) -> np.ndarray:
    """The published hash on numpy uint32 (whose products wrap modulo 2^32 by definition)."""
    x = x.astype(np.uint32)
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x7FEB352D)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x846CA68B)
    x ^= x >> np.uint32(16)
    return x


def test_mix32_is_lowbias32_exactly_on_tensors_and_python_ints():
    words = np.random.default_rng(0).integers(0, 2**32, size=4096, dtype=np.uint64)
    words[:3] = [0, 1, MASK32]
    want = lowbias32_reference(words).astype(np.int64)
    got = mix32(torch.from_numpy(words.astype(np.int64)))
    assert torch.equal(got, torch.from_numpy(want))
    assert [mix32(int(w)) for w in words[:50]] == want[:50].tolist()


def test_noise_depends_only_on_its_coordinates():
    vocab = 50
    examples = torch.tensor([7, 3, 2**40 + 3, 11])
    step = torch.tensor(5)
    u = uniform_noise(123, examples, step, vocab)
    assert u.dtype == torch.float32 and u.shape == (4, vocab)
    assert (u > 0).all() and (u < 1).all()
    # A row's noise does not depend on the other rows, their number or their order.
    for row in range(4):
        assert torch.equal(uniform_noise(123, examples[row:row + 1], step, vocab)[0], u[row])
    assert torch.equal(uniform_noise(123, examples.flip(0), step, vocab), u.flip(0))
    # Every coordinate matters (example 3 and 2^40 + 3 differ only in the high word).
    assert not torch.equal(u[1], u[2])
    assert not torch.equal(uniform_noise(123, examples, torch.tensor(6), vocab), u)
    assert not torch.equal(uniform_noise(124, examples, step, vocab), u)
    assert not torch.equal(uniform_noise(123 + 2**32, examples, step, vocab), u)


def test_noise_is_uniform_and_uncorrelated():
    u = uniform_noise(0, torch.arange(256), torch.tensor(3), 1024).double()
    assert abs(u.mean().item() - 0.5) < 0.002  # 5 standard errors: sqrt(1/12 / 262144) = 5.6e-4
    assert abs(u.var().item() - 1 / 12) < 0.001
    # Neighbouring vocab ids, neighbouring examples: correlations within 5 standard errors of 0.
    for a, b in ((u[:, 1:], u[:, :-1]), (u[1:], u[:-1])):
        assert abs(np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1]) < 5 / a.numel() ** 0.5


def chi_square(observed: np.ndarray, expected: np.ndarray) -> float:
    return float(((observed - expected) ** 2 / expected).sum())


def test_draws_follow_the_distribution_and_are_independent_across_steps():
    probs = torch.tensor([0.05, 0.4, 0.15, 0.3, 0.1])
    sampling = SamplingConfig(max_new_tokens=1, seed=11)
    examples, steps = 2000, 10
    draws = torch.stack([sample_next_tokens(probs.log().expand(examples, 5), sampling, torch.arange(examples),
                                            torch.tensor(step)) for step in range(steps)], dim=1)  # [E, S]
    observed = np.bincount(draws.flatten().numpy(), minlength=5)
    # Goodness of fit: chi-square with 4 degrees of freedom, 18.47 is its 0.999 quantile.
    assert chi_square(observed, probs.double().numpy() * draws.numel()) < 18.47
    # Consecutive steps of one example are independent: 5 x 5 contingency table, 16 degrees of
    # freedom, 0.999 quantile 39.25.
    pairs = np.zeros((5, 5))
    np.add.at(pairs, (draws[:, :-1].flatten().numpy(), draws[:, 1:].flatten().numpy()), 1)
    independent = np.outer(pairs.sum(1), pairs.sum(0)) / pairs.sum()
    assert chi_square(pairs, independent) < 39.25


def test_a_row_draws_the_same_token_in_any_batch():
    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(0)) * 3
    examples = torch.tensor([40, 2, 17, 5, 99, 0])
    sampling = SamplingConfig(max_new_tokens=1, top_p=0.9, top_k=50, temperature=0.8, seed=4)
    step = torch.tensor(8)
    together = sample_next_tokens(logits, sampling, examples, step)
    alone = torch.cat([sample_next_tokens(logits[i:i + 1], sampling, examples[i:i + 1], step) for i in range(6)])
    assert torch.equal(together, alone)
    order = torch.tensor([3, 0, 5, 1, 4, 2])
    assert torch.equal(sample_next_tokens(logits[order], sampling, examples[order], step), together[order])


def test_the_draw_compiles_without_a_graph_break():
    # fullgraph tracing fails on any host read of a tensor (.item(), bool()): none here, so a CUDA
    # graph can hold the draw as well, with the step as a device counter.
    logits = torch.randn(3, 40)
    sampling = SamplingConfig(max_new_tokens=1, top_p=0.95, seed=2)
    compiled = torch.compile(sample_next_tokens, fullgraph=True, backend="aot_eager")
    examples, step = torch.tensor([1, 5, 9]), torch.tensor(0)
    for _ in range(3):
        assert torch.equal(compiled(logits, sampling, examples, step), sample_next_tokens(logits, sampling, examples, step))
        step += 1


@pytest.mark.cuda
def test_the_draw_replays_in_a_cuda_graph():
    logits = torch.randn(4, 1000, device="cuda")
    sampling = SamplingConfig(max_new_tokens=1, top_k=100, seed=3)
    examples, step = torch.tensor([3, 1, 4, 1], device="cuda"), torch.zeros((), dtype=torch.long, device="cuda")
    eager = [sample_next_tokens(logits, sampling, examples, torch.tensor(s, device="cuda")) for s in range(5)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        sample_next_tokens(logits, sampling, examples, step)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        drawn = sample_next_tokens(logits, sampling, examples, step)
    for s in range(5):
        graph.replay()
        assert torch.equal(drawn, eager[s]), s
        step += 1


@pytest.mark.parametrize("kwargs, error, message", [
    ({"max_new_tokens": 4, "min_new_tokens": 5}, ValueError, "min_new_tokens"),
    ({"max_new_tokens": 4, "min_new_tokens": -1}, ValueError, "min_new_tokens"),
    ({"max_new_tokens": 4, "stop_sequences": [[]]}, ValueError, r"stop_sequences\[0\]"),
    ({"max_new_tokens": 4, "stop_sequences": [[1], ["a"]]}, ValueError, r"stop_sequences\[1\]"),
    ({"max_new_tokens": 4, "stop_sequences": "\n"}, TypeError, "stop_sequences"),
    ({"max_new_tokens": 4, "seed": 1.5}, TypeError, "seed"),
])
def test_bad_sampling_options(kwargs, error, message):
    with pytest.raises(error, match=message):
        SamplingConfig(**kwargs)


def test_stop_sequences_are_kept_as_tuples():
    config = SamplingConfig(max_new_tokens=4, stop_sequences=[[1, 2], (3,)])
    assert config.stop_sequences == ((1, 2), (3,))
    hash(config)  # still a frozen, hashable value
