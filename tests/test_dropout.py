"""dropout.Dropout (a bool mask on a CPU) and linear.gelu_linear (the GELU recomputed in backward):
the same numbers as torch's, less kept for backward."""

import pytest
import torch
import torch.nn.functional as F

from streamgpt.dropout import Dropout, draw_keep, dropout, exact
from streamgpt.linear import Linear, _GeluLinear, gelu_linear


def saved_bytes(fn, *args) -> int:
    """Bytes of the distinct storages autograd keeps for backward of fn(*args)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(seen.values())


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_drops_with_probability_p_and_keeps_the_mean(p):
    x = torch.ones(1000, 1000)
    y = dropout(x, p)
    assert (y == 0).float().mean().item() == pytest.approx(p, abs=0.002)
    assert y.mean().item() == pytest.approx(1.0, abs=0.005)
    assert torch.all((y == 0) | (y == 1 / (1 - exact(p))))


def test_the_gradient_flows_through_the_kept_elements_only():
    x = torch.randn(64, 32, requires_grad=True)
    y = dropout(x, 0.3)
    y.backward(torch.ones_like(y))
    kept = y != 0
    assert torch.equal(x.grad != 0, kept)
    torch.testing.assert_close(x.grad[kept], torch.full_like(x.grad[kept], 1 / (1 - exact(0.3))))


def test_keeps_a_bool_mask_a_quarter_of_torchs():
    x = torch.randn(256, 128, requires_grad=True)
    assert saved_bytes(dropout, x, 0.1) == x.numel()  # 1 byte per element
    assert saved_bytes(F.dropout, x, 0.1) == 4 * x.numel()


def test_identity_in_evaluation_and_at_p_0():
    x = torch.randn(8, 8)
    layer = Dropout(0.5).eval()
    assert layer(x) is x and dropout(x, 0.0) is x


def test_a_probability_out_of_range_is_refused():
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        Dropout(1.0)


def test_a_seeded_generator_repeats_the_mask():
    a, b = (torch.empty(100, dtype=torch.bool) for _ in range(2))
    draw_keep(a, 0.5, torch.Generator().manual_seed(3))
    draw_keep(b, 0.5, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and 20 < int(a.sum()) < 80


def test_gelu_linear_equals_linear_of_gelu_in_value_and_gradient():
    layer = Linear(24, 8, bias=False)
    h = torch.randn(2, 5, 24, requires_grad=True)
    out = gelu_linear(h, layer)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (h, layer.weight), grad)
    expected = layer(F.gelu(h))
    want = torch.autograd.grad(expected, (h, layer.weight), grad)
    torch.testing.assert_close(out, expected)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_gelu_linear_gradcheck_float64():
    h = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_GeluLinear.apply, (h, w))


def test_gelu_linear_keeps_only_its_input_and_weight():
    layer = Linear(128, 32, bias=False)
    h = torch.randn(64, 128, requires_grad=True)
    weight_bytes = layer.weight.numel() * 4
    assert saved_bytes(gelu_linear, h, layer) == h.numel() * 4 + weight_bytes
    assert saved_bytes(lambda h: layer(F.gelu(h)), h) == 2 * h.numel() * 4 + weight_bytes
