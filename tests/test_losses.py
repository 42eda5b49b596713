"""The chunked loss (losses.py, model.loss_chunk): the numbers and gradients of F.cross_entropy on
full logits, in fp32 and under bf16 autocast, in the real GPT, its training and its validation."""

from __future__ import annotations

import dataclasses

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from streamgpt.bpb import nll_sums, token_nll_sums
from streamgpt.lit_module import GPTModule
from streamgpt.losses import chunked_cross_entropy, chunked_token_nll
from streamgpt.model import GPT, GPTConfig
from streamgpt.optim import OptimizerConfig, build_optimizer

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


def small(loss_chunk: int) -> GPTConfig:
    return GPTConfig(
        vocab_size=128, context=24, d_model=32, n_layers=2, n_heads=4, loss_chunk=loss_chunk
    )


def test_with_loss_chunk_the_gpt_gives_the_same_loss_and_gradients_including_the_tied_embedding():
    torch.manual_seed(0)
    x, y = torch.randint(0, 128, (4, 24)), torch.randint(0, 128, (4, 24))
    plain = GPT(small(0))
    chunked = GPT(small(7))  # 96 positions: 13 chunks and a short one
    chunked.load_state_dict(plain.state_dict())
    assert chunked.head.weight is chunked.tok_emb.weight
    logits, expected = plain(x, y)
    none, loss = chunked(x, y)
    assert logits.shape == (4, 24, 128) and none is None
    expected.backward()
    loss.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    for (name, p), q in zip(chunked.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)
    assert torch.equal(chunked(x)[0], plain(x)[0])  # without targets: logits, as always


def test_a_few_training_steps_with_and_without_loss_chunk_end_at_the_same_model():
    torch.manual_seed(1)
    x, y = torch.randint(0, 128, (8, 24)), torch.randint(0, 128, (8, 24))
    runs = {}
    for chunk in (0, 50):
        torch.manual_seed(2)
        model = GPT(small(chunk))
        optimizer = build_optimizer(model, OptimizerConfig(lr=1e-3), "cpu")
        losses = []
        for _ in range(5):
            _, loss = model(x, y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        runs[chunk] = losses, model.state_dict()
    assert runs[50][0] == pytest.approx(runs[0][0], rel=1e-5)
    assert runs[50][0][-1] < runs[50][0][0]
    for name, p in runs[50][1].items():
        torch.testing.assert_close(p, runs[0][1][name], rtol=0, atol=1e-5, msg=name)


def test_per_token_nll_and_its_bpb_sums_are_the_full_logits():
    torch.manual_seed(3)
    model = GPT(small(0)).eval()
    x, y = torch.randint(0, 128, (4, 24)), torch.randint(0, 128, (4, 24))
    byte_lengths = torch.randint(0, 4, (128,))
    with torch.no_grad():
        logits, mean = model(x, y)
        expected = nll_sums(logits, y, byte_lengths)
        for chunk in (0, 7, 1000):
            model.cfg.loss_chunk = chunk
            _, nll = model(x, y, reduction="none")
            assert nll.shape == (4, 24)
            torch.testing.assert_close(nll.mean(), mean)
            torch.testing.assert_close(token_nll_sums(nll, y, byte_lengths), expected)


def validate(loss_chunk: int, batches) -> dict[str, float]:
    torch.manual_seed(4)
    model = dataclasses.asdict(small(loss_chunk))
    lit = GPTModule(model, {"name": "adamw"})
    lit.set_token_bytes(torch.arange(128) % 3)
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.validate(lit, DataLoader(batches, batch_size=None), verbose=False)
    return {k: v.item() for k, v in trainer.callback_metrics.items()}


def test_validation_logs_the_same_loss_and_bpb_with_loss_chunk():
    torch.manual_seed(5)
    batches = [(torch.randint(0, 128, (4, 24)), torch.randint(0, 128, (4, 24))) for _ in range(3)]
    plain, chunked = validate(0, batches), validate(7, batches)
    assert {"val/loss", "val/bpb"} <= plain.keys()
    assert chunked == pytest.approx(plain, rel=1e-6)


def test_a_checkpoint_from_before_loss_chunk_loads(tmp_path):
    lit = GPTModule(dataclasses.asdict(small(0)), {"name": "adamw"})
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False)
    trainer.strategy.connect(lit)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    state = torch.load(tmp_path / "m.ckpt", weights_only=False)
    del state["hyper_parameters"]["model"]["loss_chunk"]
    torch.save(state, tmp_path / "old.ckpt")
    loaded = GPTModule.load_from_checkpoint(tmp_path / "old.ckpt")
    assert loaded.gpt.cfg.loss_chunk == GPTConfig.loss_chunk
    assert loaded.state_dict().keys() == lit.state_dict().keys()


@pytest.mark.slow
def test_the_chunked_loss_compiles_and_gives_the_eager_gradients():
    torch.manual_seed(6)
    model = GPT(small(40))
    x, y = torch.randint(0, 128, (4, 24)), torch.randint(0, 128, (4, 24))
    _, loss = torch.compile(model)(x, y)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    _, eager = model(x, y)
    eager.backward()
    torch.testing.assert_close(loss, eager)
    for g, p in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-7)


def test_under_fp16_autocast_the_small_gradients_do_not_flush_to_zero():
    """softmax / rows is ~3e-8 here, below fp16's smallest number: 16-mixed's loss scale comes
    only in backward, so the chunked gradient must not pass through fp16 before it."""
    g = torch.Generator().manual_seed(7)
    h = torch.randn(16384, 16, generator=g, requires_grad=True)
    w = (torch.randn(2048, 16, generator=g) * 0.3).requires_grad_()
    t = torch.randint(0, 2048, (16384,), generator=g)
    exact = loss_and_grads(full, h, w, t)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = chunked_cross_entropy(h, w, t, 4096)
    (65536.0 * loss).backward()
    torch.testing.assert_close(loss, exact[0], rtol=1e-3, atol=0)
    scale = exact[2].abs().max().item()
    torch.testing.assert_close(w.grad / 65536 * 3, exact[2], rtol=0, atol=0.01 * scale)
