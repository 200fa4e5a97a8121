"""The optimizer's parameter groups: weight decay on weight matrices only (Hugging Face's rule), on
GPT-2 and Llama models, in plain and in-backward optimizers; a reset forgets every moment."""
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Trainer

from spin_trainer.optim import decayed_parameters, make_optimizer, reset_state
from spin_trainer.parallel.mesh import ParallelContext

CTX = ParallelContext(0, 1, 1, 1, 0, 0, torch.device("cpu"))


def tiny_gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2))


def tiny_llama():
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, attention_bias=True,
                                        mlp_bias=True, tie_word_embeddings=False))


@pytest.fixture(params=[tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def model(request):
    torch.manual_seed(0)
    return request.param()


def test_decay_follows_the_hugging_face_trainer(model):
    # Compared as parameters: HF lists a tied weight under both of its names.
    names = {param: name for name, param in model.named_parameters()}
    theirs = {model.get_parameter(n) for n in Trainer.get_decay_parameter_names(None, model)}
    ours = {p for p, decays in decayed_parameters(model).items() if decays}
    assert sorted(names[p] for p in ours) == sorted(names[p] for p in theirs)
    skipped = [names[p] for p, decays in decayed_parameters(model).items() if not decays]
    assert any(n.endswith("bias") for n in skipped) and any("ln" in n or "norm" in n for n in skipped)


@pytest.mark.parametrize("in_backward", [False, True])
@pytest.mark.parametrize("name", ["adamw", "rmsprop"])
def test_a_step_on_zero_gradients_decays_matrices_and_leaves_biases_and_norms(model, name, in_backward):
    # A zero gradient isolates the decay: AdamW shrinks by (1 - lr · wd), RMSprop's L2 term moves the
    # matrices; biases and norm weights stay exactly where they were.
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    decays = {n: decayed_parameters(model)[p] for n, p in model.named_parameters()}
    optimizer = make_optimizer(model, ctx=CTX, lr=1e-2, name=name, weight_decay=0.5, in_backward=in_backward)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for n, p in model.named_parameters():
        if not decays[n]:
            assert torch.equal(p, before[n]), n
        elif name == "adamw":
            torch.testing.assert_close(p, before[n] * (1 - 1e-2 * 0.5), rtol=1e-6, atol=0)
        else:
            assert not torch.equal(p, before[n]), n
    if in_backward:
        optimizer.remove_hooks()


@pytest.mark.parametrize("in_backward", [False, True])
def test_reset_state_makes_the_next_step_a_fresh_optimizers(in_backward):
    torch.manual_seed(0)
    model, twin = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    optimizer = make_optimizer(model, ctx=CTX, lr=1e-2, in_backward=in_backward)
    for _ in range(3):   # moments and step counts to forget
        model(torch.randn(2, 4)).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    reset_state(optimizer)
    assert len(optimizer.state) == 0
    twin.load_state_dict(model.state_dict())
    fresh = torch.optim.AdamW(twin.parameters(), lr=1e-2, weight_decay=0.0)
    x = torch.randn(2, 4)
    model(x).square().sum().backward()
    twin(x).square().sum().backward()
    optimizer.step()
    fresh.step()
    for ours, theirs in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    if in_backward:
        optimizer.remove_hooks()
