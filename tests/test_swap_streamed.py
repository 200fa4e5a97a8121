"""streamed_reference_forward equals the plain forward of the reference, and leaves the policy alone."""
import os

import pytest
import torch

from spin_kernels.swap import WeightBank, streamed_reference_forward

pytest.importorskip("transformers")
from spin_trainer.model import build_tiny_llama  # noqa: E402

BACKENDS = [pytest.param("ext", marks=pytest.mark.skipif(os.environ.get("SPIN_KERNELS_NO_EXT") == "1",
                                                         reason="SPIN_KERNELS_NO_EXT=1")),
            "torch"]


def _llama(seed, tied=False, layers=3, dtype=torch.float32, vocab=97):
    model = build_tiny_llama(vocab, hidden_size=32, intermediate_size=48, num_layers=layers, tie_word_embeddings=tied,
                             seed=seed, dtype=dtype).eval()
    with torch.no_grad():  # random-init norms are all ones: make them matter
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model


def _bits(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tied,dtype", [(False, torch.float32), (True, torch.float32), (False, torch.bfloat16)])
def test_streamed_forward_equals_the_plain_forward(backend, tied, dtype):
    reference, policy = _llama(1, tied, dtype=dtype), _llama(2, tied, dtype=dtype)
    bank = WeightBank.from_module(reference, backend=backend)
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(0))
    policy_before = _bits(policy)
    policy_params = dict(policy.named_parameters())
    with torch.no_grad():
        expected = reference(ids).logits
        expected_hidden = reference.model(ids).last_hidden_state
        own = policy(ids).logits
    logits = streamed_reference_forward(policy, bank, ids)
    hidden = streamed_reference_forward(policy, bank, ids, return_hidden=True)
    assert torch.equal(logits, expected)
    assert torch.equal(hidden, expected_hidden)
    assert not torch.equal(own, expected)  # the policy really is a different model
    for name, tensor in policy.state_dict().items():
        assert torch.equal(tensor, policy_before[name]), name
    assert all(p is policy_params[n] for n, p in policy.named_parameters())  # the same Parameter objects
    assert _hooks(policy) == 0
    with torch.no_grad():
        assert torch.equal(policy(ids).logits, own)


def test_streamed_forward_with_padding_mask():
    reference, policy = _llama(3), _llama(4)
    bank = WeightBank.from_module(reference)
    ids = torch.randint(0, 97, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    mask[2, 7:] = 0  # right padding
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask).logits
    assert torch.equal(streamed_reference_forward(policy, bank, ids, attention_mask=mask), expected)


@pytest.mark.parametrize("layers", [1, 2, 4])
def test_streamed_forward_with_a_head_copied_in_pieces(layers):
    # A 4 MB LM head goes over in 1 MB pieces spread over the last layers' copies.
    reference, policy = _llama(10, layers=layers, vocab=32768), _llama(11, layers=layers, vocab=32768)
    bank = WeightBank.from_module(reference)
    ids = torch.randint(0, 32768, (2, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = reference(ids).logits
    assert torch.equal(streamed_reference_forward(policy, bank, ids), expected)


def test_streamed_forward_of_a_one_layer_model():
    reference, policy = _llama(5, layers=1), _llama(6, layers=1)
    bank = WeightBank.from_module(reference)
    ids = torch.randint(0, 97, (1, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference(ids).logits
    assert torch.equal(streamed_reference_forward(policy, bank, ids), expected)


def test_streamed_forward_errors_and_restores_after_a_failure():
    reference, policy = _llama(7), _llama(8)
    bank = WeightBank.from_module(reference)
    ids = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match="input_ids must lie in"):
        streamed_reference_forward(policy, bank, ids + 97)
    with pytest.raises(ValueError, match="integer tensor"):
        streamed_reference_forward(policy, bank, ids.float())
    with pytest.raises(ValueError, match="does not match"):
        streamed_reference_forward(_llama(9, layers=2), bank, ids)
    with pytest.raises(ValueError, match="Hugging Face decoder"):
        streamed_reference_forward(torch.nn.Linear(3, 3), bank, ids)
    with pytest.raises(TypeError, match="WeightBank"):
        streamed_reference_forward(policy, reference.state_dict(), ids)
    before = _bits(policy)
    params = dict(policy.named_parameters())

    def failing(module, args, output):
        raise RuntimeError("layer 1 failed")

    handle = policy.model.layers[1].register_forward_hook(failing)
    try:
        with pytest.raises(RuntimeError, match="layer 1 failed"):
            streamed_reference_forward(policy, bank, ids)
    finally:
        handle.remove()
    assert all(p is params[n] for n, p in policy.named_parameters())
    assert all(torch.equal(t, before[n]) for n, t in policy.state_dict().items())
    assert _hooks(policy) == 0
