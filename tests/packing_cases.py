"""Packed against padded pair batches through the trainer's own Scorer, on tiny Llama, Mistral and
Qwen2 models, in whatever layout the process group gives (no tests here): test_packing_equality.py
runs `measure` on one process and, through packing_equality_worker.py, on dp2 x tp2, and holds the
results to issue 17's targets.

The models are built from a seed (every rank builds the same weights, as tensor parallelism's
`distribute_tensor` expects), with a larger initializer range than Hugging Face's 0.02, so that
attention is sharp enough for a token that sees the wrong context to move its log-prob well past
bf16's noise. Qwen2's q/k/v biases, zero after HF's initialisation, get random values, so that the
column-parallel split of a bias is exercised.
"""
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, \
    Qwen2ForCausalLM

from spin_kernels.dtensor import local_tensor

from spin_trainer.data import IGNORE_INDEX, Example, collate_pairs
from spin_trainer.logprobs import Scorer
from spin_trainer.packing import pack_pairs
from spin_trainer.parallel.apply import parallelize_model
from spin_trainer.parallel.precision import Precision

FAMILIES = ("llama", "mistral", "qwen2")
DTYPES = ("float32", "bfloat16")
HEADS = ("logits", "fused")
CASES = [(family, dtype, head) for family in FAMILIES for dtype in DTYPES for head in HEADS]
VOCAB, PAD, PAIRS, BETA = 64, 0, 3, 0.5
# Every count divisible by tp=2 (tp_plan.check_tensor_parallel); 2 layers so that Qwen2 has a full and
# a windowed one.
SHAPE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, pad_token_id=PAD, tie_word_embeddings=False,
             initializer_range=0.1)


def tiny_model(family):
    """fp32 weights, sdpa attention, eval mode (no dropout), the same on every rank."""
    torch.manual_seed(0)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**SHAPE))
    elif family == "mistral":   # a window shorter than the pairs: the window rule applies
        model = MistralForCausalLM(MistralConfig(**SHAPE, sliding_window=6))
    else:                       # layer 0 full attention, layer 1 windowed; bias on q/k/v
        model = Qwen2ForCausalLM(Qwen2Config(**SHAPE, use_sliding_window=True, sliding_window=6, max_window_layers=1))
        with torch.no_grad():
            for layer in model.model.layers:
                for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    projection.bias.normal_(0, 0.5)
    model.config._attn_implementation = "sdpa"
    return model.eval()


def random_pairs(seed, count=PAIRS):
    """(prompt, gold, generated) token lists of various lengths, most pairs longer than the sliding window."""
    generator = torch.Generator().manual_seed(seed)

    def tokens(low, high):
        length = int(torch.randint(low, high, (1,), generator=generator))
        return torch.randint(1, VOCAB, (length,), generator=generator).tolist()

    return [(tokens(2, 9), tokens(3, 12), tokens(3, 12)) for _ in range(count)]


def padded_batch(pairs):
    examples = [Example(tuple(prompt), tuple(gold)) for prompt, gold, _ in pairs]
    return collate_pairs(examples, [generated for _, _, generated in pairs], PAD)


@torch.no_grad()
def exact_logps(family, pairs):
    """[2B] float64 sums of the padded batch's response log-probs: the oracle, by Hugging Face's
    forward and torch's log_softmax alone (no Scorer, no packing, no parallelism)."""
    model = tiny_model(family).double()
    batch = padded_batch(pairs)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    labels = batch.labels.clamp(min=0)
    token_logps = logits.log_softmax(-1).gather(-1, labels[..., None])[..., 0]
    return (token_logps * (batch.labels != IGNORE_INDEX)).sum(-1)


def reference_logps(exact):
    """A reference away from the policy (rewards of either sign, none near 0), the same for both layouts."""
    count = exact.shape[0]
    return exact.float() - torch.linspace(0.3, 1.2, count) * torch.tensor([1.0, -1.0]).repeat(count // 2)


LAYOUTS = {"padded": padded_batch, "packed": pack_pairs,
           # flash-attn's packed layout (a prompt per response, documents told apart by position ids)
           "separate": lambda pairs: pack_pairs(pairs, share_prompt=False)}


def measure(family, dtype, head, ctx, pairs):
    """{"exact": the oracle's [2B] sums (exact_logps), "head_rows": the rows of the LM head's weight
    this rank holds, and per layout of LAYOUTS {"logps": the reference's no-grad sums [2B],
    "policy_logps", "rewards" [2B] and "loss" of the SPIN loss, "grads": this rank's local gradient of
    every parameter}}, for the model of `family` parallelized as the trainer does (`ctx`; FSDP's
    cast in bf16), scored by the trainer's Scorer with `head`."""
    precision = Precision(dtype)
    model = parallelize_model(tiny_model(family), ctx, precision)
    scorer = Scorer(ctx, precision, head)
    exact = exact_logps(family, pairs)
    ref = reference_logps(exact)
    results = {"exact": exact, "head_rows": local_tensor(model.get_output_embeddings().weight).shape[0]}
    for layout, make_batch in LAYOUTS.items():
        batch = make_batch(pairs)
        logps = scorer.sequence_logps(model, batch)
        out = scorer.pair_loss(model, batch, ref, beta=BETA, loss_type="sigmoid")
        out.loss.backward()
        results[layout] = {"logps": logps, "policy_logps": out.policy_logps, "rewards": out.rewards,
                           "loss": out.loss.detach(),
                           "grads": {name: local_tensor(p.grad).clone() for name, p in model.named_parameters()}}
        model.zero_grad(set_to_none=True)
    return results
