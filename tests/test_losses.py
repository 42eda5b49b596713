"""The chunked loss (losses.py): the numbers and gradients of F.cross_entropy on full logits, in
fp32 and under bf16 autocast."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from streamgpt.losses import chunked_cross_entropy, chunked_token_nll

N, D, V = 200, 32, 300
CHUNKS = [1, 7, 64, N, 4096]  # 7 and 64 do not divide N; 4096 is one chunk larger than N


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g, requires_grad=True)
    w = (torch.randn(V, D, generator=g) * 0.3).requires_grad_()
    return h, w, torch.randint(0, V, (N,), generator=g)


def loss_and_grads(loss_fn, h, w, targets, autocast: bool = False):
    h.grad = w.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = loss_fn(h, w, targets)
    (3.0 * loss).backward()  # an upstream gradient other than 1 is applied too
    return loss.detach(), h.grad.clone(), w.grad.clone()


def full(h, w, targets):
    return F.cross_entropy(F.linear(h, w).float(), targets)


@pytest.mark.parametrize("chunk", CHUNKS)
def test_the_chunked_loss_and_its_gradients_are_full_cross_entropys_in_fp32(chunk):
    h, w, t = inputs()
    expected = loss_and_grads(full, h, w, t)
    loss, grad_h, grad_w = loss_and_grads(
        lambda *a: chunked_cross_entropy(*a, chunk=chunk), h, w, t
    )
    torch.testing.assert_close(loss, expected[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(grad_h, expected[1], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad_w, expected[2], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("chunk", CHUNKS)
def test_under_bf16_autocast_the_chunked_loss_is_as_close_to_fp32_as_full_logits_are(chunk):
    """Both multiply in bf16 and take the softmax in fp32: the same loss to 1e-5. Their gradients
    round differently (the chunked weight gradient is summed in fp32, autograd's in one bf16
    matmul); each is within 1% of the largest entry of the fp32 gradient, and so of the other."""
    h, w, t = inputs(1)
    exact = loss_and_grads(full, h, w, t)
    bf16_full = loss_and_grads(full, h, w, t, autocast=True)
    chunked = loss_and_grads(lambda *a: chunked_cross_entropy(*a, chunk=chunk), h, w, t, True)
    torch.testing.assert_close(chunked[0], bf16_full[0], rtol=1e-5, atol=0)
    for mine, theirs, reference in zip(chunked[1:], bf16_full[1:], exact[1:], strict=True):
        scale = reference.abs().max().item()
        torch.testing.assert_close(mine, reference, rtol=0, atol=0.01 * scale)
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0.01 * scale)


@pytest.mark.parametrize("autocast", [False, True])
def test_the_chunked_token_nll_is_full_cross_entropy_per_token(autocast):
    h, w, t = inputs(2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        expected = F.cross_entropy(F.linear(h, w).float(), t, reduction="none")
        for chunk in CHUNKS:
            torch.testing.assert_close(chunked_token_nll(h, w, t, chunk), expected)
