"""attention.causal_dropout_attention: the causal attention with dropout the model trains with on
a CPU, against a plain reference that drops the same probabilities."""

import pytest
import torch
import torch.nn.functional as F

import streamgpt.attention as attention
from streamgpt.attention import causal_dropout_attention, use_chunked
from streamgpt.dropout import exact
from streamgpt.model import GPT, GPTConfig


def qkv(B=3, H=2, T=9, hd=4, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, hd, generator=g, dtype=dtype).requires_grad_() for _ in "qkv"]


def reference(q, k, v, keep, p):
    """Softmax attention with the causal mask and dropout written out, all (T, T) at once."""
    T = q.size(-2)
    scores = (q @ k.transpose(-1, -2)) * q.size(-1) ** -0.5
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return (scores.softmax(-1) * keep / (1 - p)) @ v


@pytest.fixture
def small_chunks(monkeypatch):
    """A few rows per chunk, so the tests cross chunk boundaries (and a ragged last chunk)."""
    monkeypatch.setattr(attention, "CHUNK_SCORES", 2 * 9 * 9)


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5])
def test_forward_and_gradients_equal_the_reference_with_the_same_mask(small_chunks, p):
    q, k, v = qkv()
    keep = torch.rand(3, 2, 9, 9, generator=torch.Generator().manual_seed(1)) >= p
    grad = torch.randn(3, 2, 9, 4, generator=torch.Generator().manual_seed(2))
    out = causal_dropout_attention(q, k, v, p, keep=keep)
    expected = reference(q, k, v, keep, p)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(expected, (q, k, v), grad)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_without_dropout_equals_scaled_dot_product_attention(small_chunks):
    q, k, v = qkv()
    out = causal_dropout_attention(q, k, v, 0.0)
    torch.testing.assert_close(
        out, F.scaled_dot_product_attention(q, k, v, is_causal=True), rtol=1e-5, atol=1e-6
    )


def test_gradcheck_float64(small_chunks):
    q, k, v = qkv(B=2, H=1, T=9, hd=3, dtype=torch.float64)
    keep = torch.rand(2, 1, 9, 9, generator=torch.Generator().manual_seed(3)) >= 0.3
    assert torch.autograd.gradcheck(
        lambda q, k, v: causal_dropout_attention(q, k, v, 0.3, keep=keep), (q, k, v)
    )


def test_a_position_never_sees_the_future(small_chunks):
    q, k, v = qkv()
    keep = torch.ones(3, 2, 9, 9, dtype=torch.bool)
    out = causal_dropout_attention(q, k, v, 0.2, keep=keep)
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[:, :, 5:] += 100.0  # change keys and values of positions 5..8
    v2[:, :, 5:] -= 100.0
    changed = causal_dropout_attention(q, k2, v2, 0.2, keep=keep)
    assert torch.equal(out[:, :, :5], changed[:, :, :5])
    out[:, :, :5].sum().backward()
    assert torch.count_nonzero(k.grad[:, :, 5:]) == 0 and torch.count_nonzero(v.grad[:, :, 5:]) == 0


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keeps_each_probability_with_probability_one_minus_p(p):
    # q = 0: every query attends uniformly to its T visible positions, so the last position's
    # output (with v = 1) is the share of its T probabilities kept, scaled by 1 / (1 - p).
    B, H, T = 64, 8, 64
    q = k = torch.zeros(B, H, T, 4)
    out = causal_dropout_attention(q, k, torch.ones(B, H, T, 4), p)
    kept_share = out[:, :, -1, 0] * (1 - exact(p))
    assert kept_share.mean().item() == pytest.approx(1 - p, abs=0.005)
    assert out[:, :, -1, 0].mean().item() == pytest.approx(1.0, abs=0.01)  # unbiased


def test_a_seeded_generator_repeats_the_mask():
    q, k, v = qkv()
    first = causal_dropout_attention(q, k, v, 0.5, generator=torch.Generator().manual_seed(7))
    again = causal_dropout_attention(q, k, v, 0.5, generator=torch.Generator().manual_seed(7))
    other = causal_dropout_attention(q, k, v, 0.5, generator=torch.Generator().manual_seed(8))
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_under_bfloat16_autocast_runs_in_bfloat16():
    q, k, v = (t.detach().bfloat16() for t in qkv())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = causal_dropout_attention(q, k, v, 0.0)
    assert out.dtype == torch.bfloat16
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    torch.testing.assert_close(out.float(), expected, rtol=0.05, atol=0.05)


def test_only_cpu_training_calls_with_dropout_and_a_causal_mask_use_it():
    cpu, meta = torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2, device="meta")
    assert use_chunked(cpu, 0.1, True, None)
    assert not use_chunked(cpu, 0.0, True, None)  # no dropout: SDPA's fused kernel
    assert not use_chunked(meta, 0.1, True, None)  # other devices: SDPA
    assert not use_chunked(cpu, 0.1, False, torch.ones(2, 2, dtype=torch.bool))  # KV cache


def test_other_devices_are_refused_with_the_function_to_use():
    q = torch.zeros(1, 1, 2, 2, device="meta")
    with pytest.raises(ValueError, match="scaled_dot_product_attention"):
        causal_dropout_attention(q, q, q, 0.1)


def test_a_keep_mask_of_the_wrong_shape_is_refused():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="keep must be a bool tensor of shape"):
        causal_dropout_attention(q, k, v, 0.1, keep=torch.ones(3, 2, 9, 8, dtype=torch.bool))


def test_the_model_uses_it_when_training_with_dropout_only(monkeypatch):
    calls = []
    original = causal_dropout_attention

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr("streamgpt.model.causal_dropout_attention", counted)
    cfg = GPTConfig(vocab_size=32, context=8, d_model=16, n_layers=2, n_heads=2, dropout=0.1)
    model, idx = GPT(cfg), torch.randint(0, 32, (2, 8))
    model.train()
    _, loss = model(idx, idx)
    loss.backward()
    assert len(calls) == 2 and torch.isfinite(loss)
    model.eval()
    model(idx, idx)
    model.generate([1, 2], 3)
    assert len(calls) == 2  # evaluation and sampling: scaled_dot_product_attention
