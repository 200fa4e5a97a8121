"""Every bad input of DESIGN.md gets an error that names what is wrong."""
import numpy as np
import pytest
import torch

from spin_kernels import (SpinLoss, linear_sequence_logprobs, linear_spin_loss,
                          linear_token_logprobs, sequence_logprobs, spin_loss, spin_loss_from_logps,
                          token_logprobs)

V = 50


def _ok():
    return torch.randn(4, 6, V), torch.randint(0, V, (4, 6)), torch.randn(4)


@pytest.mark.parametrize("call,error,match", [
    (lambda x, y, r: token_logprobs(x, y[:, :5]), ValueError, r"labels must have the shape.*\(4, 6\)"),
    (lambda x, y, r: token_logprobs(x, y.float()), TypeError, "labels must be an integer tensor"),
    (lambda x, y, r: token_logprobs(x.long(), y), TypeError, "logits must be float32, bfloat16"),
    (lambda x, y, r: token_logprobs(x, y.masked_fill(y == y[0, 0], V)), ValueError,
     r"labels must lie in \[0, 50\)"),
    (lambda x, y, r: token_logprobs(x, y.masked_fill(y == y[0, 0], -3)), ValueError,
     "or equal ignore_index=-100"),
    (lambda x, y, r: token_logprobs(x, y, temperature=0.0), ValueError, "temperature must be"),
    (lambda x, y, r: token_logprobs(x, y, backend="cuda"), ValueError, "backend must be one of"),
    (lambda x, y, r: token_logprobs(x[..., :0], y), ValueError, "V > 0"),
    (lambda x, y, r: spin_loss(x[:3], y[:3], r[:3]), ValueError, "even, nonzero number of rows"),
    (lambda x, y, r: spin_loss(x[0], y[0], r), ValueError, r"logits must be \[2B, T, V\]"),
    (lambda x, y, r: spin_loss(x, y, r[:2]), ValueError, r"ref_logps must be \[4\] or \[4, 6\]"),
    (lambda x, y, r: spin_loss(x, y, r, loss_type="ipo"), ValueError, "loss_type must be one of"),
    (lambda x, y, r: spin_loss(x, y, r, beta=-1.0), ValueError, "beta must be"),
    (lambda x, y, r: spin_loss(x, y, r, loss_mask=torch.ones(4, 5)), ValueError,
     r"loss_mask must have the shape of labels \(4, 6\)"),
    (lambda x, y, r: sequence_logprobs(x[0], y[0]), ValueError, r"logits must be \[S, T, V\]"),
    (lambda x, y, r: spin_loss(x, y[..., None], r, loss_mask=torch.ones(4, 6)), ValueError,
     r"labels must be \[S, T\] = \(4, 6\).*got \(4, 6, 1\)"),
    (lambda x, y, r: spin_loss_from_logps(r[:3], r[:3]), ValueError, r"policy_logps must be \[2B\]"),
    (lambda x, y, r: spin_loss_from_logps(r, r[:2]), ValueError, "ref_logps must match"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_input(call, error, match):
    logits, labels, ref = _ok()
    with pytest.raises(error, match=match):
        call(logits, labels, ref)


@pytest.mark.parametrize("beta,error,match", [
    (torch.tensor(-0.1), ValueError, r"beta must be a finite number > 0, got -0.1"),
    (torch.tensor(0.0), ValueError, "beta must be a finite number > 0"),
    (torch.tensor(float("inf")), ValueError, "beta must be a finite number > 0"),
    (torch.tensor(float("nan")), ValueError, "beta must be a finite number > 0"),
    (np.float32(-0.5), ValueError, "beta must be a finite number > 0"),
    (np.array(float("inf")), ValueError, "beta must be a finite number > 0"),
    (float("nan"), ValueError, "beta must be a finite number > 0"),
    (torch.tensor([0.1, 0.2]), ValueError, r"beta must be a number or a 0-dim tensor.*\(2,\)"),
    (np.array([0.1]), ValueError, r"beta must be a number or a 0-dim tensor/array.*\(1,\)"),
    ("0.1", TypeError, "beta must be a number .* got str '0.1'"),
    (None, TypeError, "beta must be a number"),
    (True, TypeError, "beta must be a number"),
    (torch.tensor(True), TypeError, "beta must be a real number"),
], ids=repr)
@pytest.mark.parametrize("entry", ["spin_loss", "spin_loss_from_logps", "linear_spin_loss"])
def test_bad_beta(entry, beta, error, match):
    logits, labels, ref = _ok()
    with pytest.raises(error, match=match):
        if entry == "spin_loss":
            spin_loss(logits, labels, ref, beta=beta)
        elif entry == "linear_spin_loss":
            linear_spin_loss(torch.randn(4, 6, 8), torch.randn(V, 8), labels, ref, beta=beta)
        else:
            spin_loss_from_logps(ref, ref.flip(0), beta=beta)


@pytest.mark.parametrize("entry", ["spin_loss", "SpinLoss", "spin_loss_from_logps", "linear_spin_loss"])
def test_beta_and_loss_type_are_checked_once_per_call(entry, monkeypatch):
    # One check per public call, in one function; inner layers (the pair loss, the fused head's
    # op and slopes) take them as checked.
    import spin_kernels.loss.linear as linear_module
    import spin_kernels.loss.logits as logits_module
    import spin_kernels.loss.pair as pair_module
    from spin_kernels.loss.validation import check_loss_args

    calls = []

    def counting(beta, loss_type):
        calls.append((beta, loss_type))
        return check_loss_args(beta, loss_type)

    for module in (linear_module, logits_module, pair_module):
        monkeypatch.setattr(module, "check_loss_args", counting)
    logits, labels, ref = _ok()
    kw = dict(beta=0.4, loss_type="hinge")
    if entry == "spin_loss":
        spin_loss(logits, labels, ref, **kw)
    elif entry == "SpinLoss":
        SpinLoss(**kw)(logits, labels, ref)
    elif entry == "linear_spin_loss":
        linear_spin_loss(torch.randn(4, 6, 8, requires_grad=True), torch.randn(V, 8), labels, ref,
                         **kw).loss.backward()
    else:
        spin_loss_from_logps(ref, ref.flip(0), **kw)
    assert calls == [(0.4, "hinge")]


@pytest.mark.parametrize("beta", [0.3, 3, np.float64(0.3), np.float32(0.3), np.array(0.3), torch.tensor(0.3),
                                  torch.tensor(0.3, dtype=torch.float64)], ids=repr)
def test_beta_as_number_array_or_tensor_gives_the_same_loss(beta):
    logits, labels, ref = _ok()
    want = spin_loss(logits, labels, ref, beta=float(beta))
    got = spin_loss(logits, labels, ref, beta=beta)
    assert got.loss.dtype == torch.float32
    torch.testing.assert_close(got.loss, want.loss)
    for name in want.metrics:
        torch.testing.assert_close(got.metrics[name], want.metrics[name])


@pytest.mark.cuda
def test_beta_on_the_gpu_is_checked_without_a_host_sync():
    # Reading a CUDA β on the host would stall the stream each step: a bad one gives NaN instead.
    policy, ref = torch.randn(4, device="cuda"), torch.randn(4, device="cuda")
    want = spin_loss_from_logps(policy, ref, beta=0.2)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        good = spin_loss_from_logps(policy, ref, beta=torch.tensor(0.2, device="cuda"))
        bad = spin_loss_from_logps(policy, ref, beta=torch.tensor(-0.2, device="cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(good.loss, want.loss)
    assert torch.isnan(bad.loss) and torch.isnan(bad.metrics["rewards_all_mean"])


H = 8


def _head():
    """hidden [4, 6, H], weight [V, H], bias [V], labels [4, 6], ref [4]."""
    return torch.randn(4, 6, H), torch.randn(V, H), torch.randn(V), torch.randint(0, V, (4, 6)), \
        torch.randn(4)


@pytest.mark.parametrize("call,error,match", [
    (lambda h, w, b, y, r: linear_token_logprobs(h, w[:, :5], y), ValueError,
     r"same width H: hidden \(4, 6, 8\), weight \(50, 5\)"),
    (lambda h, w, b, y, r: linear_token_logprobs(h, w.bfloat16(), y), TypeError,
     r"weight must have the dtype of hidden \(torch.float32\), got torch.bfloat16"),
    (lambda h, w, b, y, r: linear_token_logprobs(h.double(), w.double(), y), TypeError,
     "hidden must be float32, bfloat16 or float16"),
    (lambda h, w, b, y, r: linear_token_logprobs(h, w, y, bias=b[:7]), ValueError,
     r"bias must be \[V\] = \(50,\).*got \(7,\)"),
    (lambda h, w, b, y, r: linear_token_logprobs(h, w, y, bias=b.half()), TypeError,
     "bias must be a torch.float32 tensor"),
    (lambda h, w, b, y, r: linear_token_logprobs(h, w[0], y), ValueError, r"weight must be \[V, H\]"),
    (lambda h, w, b, y, r: linear_token_logprobs(h, w, y[:, :5]), ValueError,
     r"labels must have the shape of hidden without its last dim.*\(4, 6\)"),
    (lambda h, w, b, y, r: linear_token_logprobs(h, w, y.float()), TypeError,
     "labels must be an integer tensor"),
    (lambda h, w, b, y, r: linear_token_logprobs(h, w, y.masked_fill(y == y[0, 0], V)), ValueError,
     r"labels must lie in \[0, 50\)"),
    (lambda h, w, b, y, r: linear_token_logprobs(h, w, y, temperature=-1.0), ValueError,
     "temperature must be"),
    (lambda h, w, b, y, r: linear_token_logprobs(h, w, y, backend="cuda"), ValueError,
     "backend must be one of"),
    (lambda h, w, b, y, r: linear_token_logprobs(h, "w", y), TypeError, "weight must be a tensor"),
    (lambda h, w, b, y, r: linear_sequence_logprobs(h[0], w, y[0]), ValueError,
     r"hidden must be \[S, T, H\]"),
    (lambda h, w, b, y, r: linear_sequence_logprobs(h, w, y, torch.ones(4, 5)), ValueError,
     r"loss_mask must have the shape of labels \(4, 6\)"),
    (lambda h, w, b, y, r: linear_spin_loss(h[:3], w, y[:3], r[:3]), ValueError,
     "even, nonzero number of rows"),
    (lambda h, w, b, y, r: linear_spin_loss(h, w, y, r[:2]), ValueError,
     r"ref_logps must be \[4\] or \[4, 6\]"),
    (lambda h, w, b, y, r: linear_spin_loss(h, w, y, r, loss_type="ipo"), ValueError,
     "loss_type must be one of"),
    (lambda h, w, b, y, r: linear_spin_loss(h, w, y, r, beta=float("nan")), ValueError,
     "beta must be"),
    (lambda h, w, b, y, r: linear_spin_loss(h, w.half(), y, r), TypeError,
     "weight must have the dtype of hidden"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_head_input(call, error, match):
    hidden, weight, bias, labels, ref = _head()
    with pytest.raises(error, match=match):
        call(hidden.requires_grad_(), weight.requires_grad_(), bias, labels, ref)


def test_head_refuses_a_dtensor_weight(one_rank_mesh):
    from torch.distributed.tensor import Shard, distribute_tensor

    hidden, weight, _, labels, _ = _head()
    sharded = distribute_tensor(weight, one_rank_mesh, [Shard(0)])
    with pytest.raises(TypeError, match=r"weight is a DTensor: pass its local shard"):
        linear_token_logprobs(hidden, sharded, labels)


def test_ignore_index_is_allowed():
    logits, labels, ref = _ok()
    labels[0, :3] = -100
    assert torch.isfinite(token_logprobs(logits, labels)).all()


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    logits, labels, _ = _ok()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        token_logprobs(logits, labels, backend="triton")


def test_inplace_needs_a_viewable_layout():
    logits = torch.randn(2, 3, 4, V).transpose(0, 1)  # 4-D, leading dims not viewable as one
    labels = torch.randint(0, V, (3, 2, 4))
    with pytest.raises(ValueError, match="inplace_backward=True needs logits"):
        token_logprobs(logits.requires_grad_(), labels, inplace_backward=True)


@pytest.mark.cuda
def test_out_of_range_label_on_gpu_gives_nan_not_a_number():
    # On the GPU the range check would need a host sync; the kernel poisons the row instead.
    logits = torch.randn(2, 5, V, device="cuda")
    labels = torch.randint(0, V, (2, 5), device="cuda")
    labels[1, 2] = V + 7
    out = token_logprobs(logits, labels)
    assert torch.isnan(out[1, 2]) and torch.isfinite(out[0]).all()
