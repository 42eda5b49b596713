"""optimizer=muon (Muon for the blocks' matrices, AdamW for the rest, one optimizer) and the wsd
schedule: who steps what, what a Muon step looks like, learning, resuming through Lightning."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from torch.utils.data import DataLoader

from streamgpt.config import register_configs, validate
from streamgpt.linear import cpu_has_native_bf16
from streamgpt.lit_module import GPTModule, pad_vocab
from streamgpt.model import GPT, GPTConfig
from streamgpt.muon import Muon, ns_dtype_for
from streamgpt.optim import OptimizerConfig, build_optimizer, build_schedule, lr_factor, wsd_factor

MUON = {"name": "muon", "lr": 0.02, "adam_lr": 3e-3, "warmup_steps": 0}
NS_DTYPES = ["bfloat16", "float32"]


def small(**overrides) -> GPT:
    cfg = {"vocab_size": 97, "context": 24, "d_model": 32, "n_layers": 2, "n_heads": 4}
    return GPT(GPTConfig(**{**cfg, **overrides}))


def batch(seed: int = 0, size: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 97, (size, 24), generator=g), torch.randint(
        0, 97, (size, 24), generator=g
    )


def block_matrices(model: GPT) -> set[str]:
    return {n for n, p in model.named_parameters() if n.startswith("blocks.") and p.dim() == 2}


def one_step(model: GPT, opt: torch.optim.Optimizer, seed: int = 0) -> dict[str, torch.Tensor]:
    """Each parameter's change in one optimizer step on a batch."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = batch(seed)
    opt.zero_grad()
    model(x, y)[1].backward()
    opt.step()
    return {n: p.detach() - before[n] for n, p in model.named_parameters()}


@pytest.mark.parametrize("ns_dtype", NS_DTYPES)
@pytest.mark.parametrize("frozen", ["muon", "adamw"])
def test_muon_steps_the_blocks_matrices_and_adamw_everything_else(frozen, ns_dtype):
    torch.manual_seed(0)
    model = small(bias=True, tie_embeddings=False)
    with torch.no_grad():  # zero at init: no gradient would reach the rest through it
        model.head.weight.normal_(std=0.02)
    cfg = OptimizerConfig(**MUON, weight_decay=0.1, muon_ns_dtype=ns_dtype)
    opt = build_optimizer(model, cfg, "cpu")
    names = {id(p): n for n, p in model.named_parameters()}
    owned = {names[id(p)] for g in opt.muon.param_groups for p in g["params"]}
    assert owned == block_matrices(model) and len(owned) == 8  # qkv, proj, up, down x 2
    for group in (opt.muon if frozen == "muon" else opt.adamw).param_groups:
        group["lr"] = 0.0  # weight decay is scaled by the lr too
    changes = one_step(model, opt)
    moved = {n for n, d in changes.items() if d.abs().max() > 0}
    rest = set(changes) - block_matrices(model)
    assert moved == (rest if frozen == "muon" else block_matrices(model)), moved
    assert {"tok_emb.weight", "head.weight", "pos_emb.weight", "norm.weight"} <= rest


@pytest.mark.parametrize("ns_dtype", NS_DTYPES)
def test_a_muon_update_of_a_matrix_is_orthogonalised(ns_dtype):
    """Newton-Schulz sends every singular value of the momentum to about the same size (within
    ~0.6-1 of the largest here), where the gradient's own spread over a factor of 50."""
    torch.manual_seed(1)
    model = small()
    cfg = OptimizerConfig(**MUON, weight_decay=0.0, muon_ns_dtype=ns_dtype)
    opt = build_optimizer(model, cfg, "cpu")
    assert opt.muon.ns_dtype == getattr(torch, ns_dtype)
    x, y = batch(size=16)
    model(x, y)[1].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    for name in sorted(block_matrices(model)):
        update = dict(model.named_parameters())[name].detach() - before[name]
        g, u = torch.linalg.svdvals(grads[name]), torch.linalg.svdvals(update)
        signal = g >= 0.02 * g[0]  # directions the gradient has (LayerNorm leaves one out)
        assert (g[signal] / g[0]).min() < 0.1, f"{name}: the gradient itself is not flat"
        assert (u[signal] / u[0]).min() > 0.5, f"{name}: {(u / u[0]).tolist()}"
        rows, cols = update.shape
        # torch's default ("original", Keller Jordan's): lr x sqrt(max(1, rows / cols)).
        assert u[0] == pytest.approx(0.02 * math.sqrt(max(1, rows / cols)), rel=0.5)


@pytest.mark.parametrize("ns_dtype", NS_DTYPES)
def test_muon_lowers_the_loss_of_a_fixed_batch(ns_dtype):
    torch.manual_seed(2)
    model = small()
    cfg = OptimizerConfig(**MUON, weight_decay=0.0, muon_ns_dtype=ns_dtype)
    opt = build_optimizer(model, cfg, "cpu")
    x, y = batch()
    losses = []
    for _ in range(12):
        opt.zero_grad()
        loss = model(x, y)[1]
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 4.0 and losses[-1] < losses[0] - 0.8, losses


# -- streamgpt.muon.Muon against torch.optim.Muon and against the algorithm -------------------

SHAPES = {"square": (48, 48), "wide": (32, 80), "tall": (80, 32)}  # tall: NS on the transpose
SETTINGS = {"lr": 0.02, "weight_decay": 0.1, "momentum": 0.95}


def muon_run(opt_class, shapes, nesterov: bool, dtype=torch.float32, steps=3, **kwargs):
    """Each matrix's change at each of `steps` steps on fixed random gradients (three, so a
    momentum buffer the step corrupted would show)."""
    g = torch.Generator().manual_seed(5)
    params = [(0.02 * torch.randn(s, generator=g)).to(dtype).requires_grad_() for s in shapes]
    grads = [[torch.randn(s, generator=g).to(dtype) for s in shapes] for _ in range(steps)]
    opt = opt_class(params, nesterov=nesterov, **SETTINGS, **kwargs)
    changes = []
    for step_grads in grads:
        before = [p.detach().clone() for p in params]
        for p, grad in zip(params, step_grads, strict=True):
            p.grad = grad
        opt.step()
        changes.append([p.detach() - b for p, b in zip(params, before, strict=True)])
    return changes, opt


def reference_muon(shapes, nesterov: bool, steps=3) -> list[list[torch.Tensor]]:
    """torch.optim.Muon's documented algorithm, written out in float64: B <- mu B + g; g + mu B
    with nesterov; Newton-Schulz (a, b, c) = (3.4445, -4.7750, 2.0315), 5 steps, on X / ||X||_F
    (transposed when tall); decay by lr x wd; step by lr x sqrt(max(1, rows / cols))."""
    changes = []
    g = torch.Generator().manual_seed(5)
    params = [(0.02 * torch.randn(s, generator=g)).double() for s in shapes]
    grads = [[torch.randn(s, generator=g).double() for s in shapes] for _ in range(steps)]
    lr, wd, mu = SETTINGS["lr"], SETTINGS["weight_decay"], SETTINGS["momentum"]
    bufs = [torch.zeros_like(p) for p in params]
    for step_grads in grads:
        changes.append([])
        for p, grad, buf in zip(params, step_grads, bufs, strict=True):
            buf.mul_(mu).add_(grad)
            x = grad + mu * buf if nesterov else buf.clone()
            x = x.T if p.size(0) > p.size(1) else x
            x = x / x.norm()
            for _ in range(5):
                a = x @ x.T
                x = 3.4445 * x + (-4.7750 * a + 2.0315 * a @ a) @ x
            x = x.T if p.size(0) > p.size(1) else x
            change = -lr * wd * p - lr * math.sqrt(max(1, p.size(0) / p.size(1))) * x
            p.add_(change)
            changes[-1].append(change)
    return changes


@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_in_bfloat16_is_torch_muon_bit_for_bit(nesterov):
    shapes = list(SHAPES.values())
    ours, our_opt = muon_run(Muon, shapes, nesterov, ns_dtype=torch.bfloat16)
    torch_s, torch_opt = muon_run(torch.optim.Muon, shapes, nesterov)
    for step, (a, b) in enumerate(zip(ours, torch_s, strict=True)):
        for shape, x, y in zip(SHAPES, a, b, strict=True):
            torch.testing.assert_close(x, y, atol=0, rtol=0, msg=f"step {step}, {shape}")
    # The same param groups and state: a checkpoint of one loads into the other.
    ours_sd, torch_sd = our_opt.state_dict(), torch_opt.state_dict()
    assert ours_sd["param_groups"] == torch_sd["param_groups"]
    torch.testing.assert_close(ours_sd["state"], torch_sd["state"], atol=0, rtol=0)
    torch_opt.load_state_dict(ours_sd)


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_muon_in_float32_is_the_algorithm_in_float64(shape, nesterov):
    """Within 1e-4 relative (measured ~1e-6); torch's bfloat16 is off by ~1e-2, its 8-bit
    mantissa."""
    ours, _ = muon_run(Muon, [SHAPES[shape]], nesterov, ns_dtype=torch.float32)
    bf16, _ = muon_run(torch.optim.Muon, [SHAPES[shape]], nesterov)
    reference = reference_muon([SHAPES[shape]], nesterov)
    for step, ([a], [b], [ref]) in enumerate(zip(ours, bf16, reference, strict=True)):
        error = (a.double() - ref).norm() / ref.norm()
        assert error < 1e-4, f"step {step}: {error:.2e}"
        assert (b.double() - ref).norm() / ref.norm() > 10 * error  # the tolerance means something


def test_auto_runs_newton_schulz_in_float32_exactly_where_bfloat16_is_slow():
    native = cpu_has_native_bf16()
    assert ns_dtype_for("auto", "cpu") == (torch.bfloat16 if native else torch.float32)
    assert ns_dtype_for("auto", "cuda") == torch.bfloat16  # torch's choice
    assert ns_dtype_for("float32", "cuda") == torch.float32
    assert ns_dtype_for("bfloat16", "cpu") == torch.bfloat16
    opt = build_optimizer(small(), OptimizerConfig(**MUON), "cpu")  # muon_ns_dtype: auto
    assert opt.muon.ns_dtype == ns_dtype_for("auto", "cpu")


@pytest.mark.parametrize("step", [0, 4, 9, 10, 50, 79, 80, 85, 99, 100, 150])
def test_the_wsd_schedule_warms_up_holds_then_decays_linearly_over_its_last_fraction(step):
    """warmup 10, decay over the last 20% of 100 steps (from step 80) to 0.1, flat after."""
    expected = (
        (step + 1) / 10
        if step < 10
        else 1.0
        if step < 80
        else 1 - 0.9 * (step - 80) / 20
        if step < 100
        else 0.1
    )
    assert wsd_factor(step, warmup=10, decay=100, floor=0.1, fraction=0.2) == pytest.approx(
        expected
    )


def test_one_schedule_scales_every_group_of_both_optimizers():
    model = small()
    for schedule, factor in (("wsd", wsd_factor), ("cosine", lr_factor)):
        cfg = OptimizerConfig(**{**MUON, "warmup_steps": 2}, schedule=schedule)
        opt = build_optimizer(model, cfg, "cpu")
        scheduler = build_schedule(opt, cfg, max_steps=20)
        for _ in range(17):
            opt.step()  # no gradients: only the schedule moves
            scheduler.step()
        args = (17, 2, 20, cfg.min_lr_ratio) + ((cfg.decay_fraction,) if schedule == "wsd" else ())
        f = factor(*args)
        assert f < 1
        assert [g["lr"] for g in opt.muon.param_groups] == pytest.approx([0.02 * f])
        assert [g["lr"] for g in opt.adamw.param_groups] == pytest.approx([3e-3 * f] * 2)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"name": "muon"}, "optimizer=muon needs optimizer.adam_lr"),
        ({"adam_lr": 1e-3}, "optimizer.adam_lr is the AdamW lr of optimizer=muon"),
        ({**MUON, "muon_momentum": 1.0}, "optimizer.muon_momentum must be in"),
        ({**MUON, "muon_ns_steps": 0}, "optimizer.muon_ns_steps >= 1"),
        ({**MUON, "muon_ns_dtype": "fp32"}, r"optimizer.muon_ns_dtype must be one of \['auto'"),
        ({"schedule": "linear"}, r"optimizer.schedule must be one of \['cosine', 'wsd'\]"),
        ({"schedule": "wsd", "decay_fraction": 0.0}, r"optimizer.decay_fraction must be in"),
    ],
)
def test_bad_muon_and_schedule_settings_are_refused_naming_the_key(bad, message):
    with pytest.raises(ValueError, match=message):
        OptimizerConfig(**bad)


def test_muon_with_fsdp_is_refused_before_any_work():
    conf = Path(__file__).resolve().parents[1] / "conf"
    register_configs(conf)
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("train", overrides=["optimizer=muon", "trainer=fsdp"])
        validate(compose("train", overrides=["optimizer=muon", "trainer=ddp"]))
    with pytest.raises(ValueError, match="optimizer=muon orthogonalises each matrix whole"):
        validate(cfg)


# -- through Lightning: the checkpoint holds both optimizers -----------------------------------


def fit(lit: GPTModule, max_steps: int, ckpt_path=None) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    data = DataLoader([batch(seed=3)] * 100, batch_size=None)  # the same batch every step
    trainer.fit(lit, data, ckpt_path=ckpt_path)
    return trainer


def module(ns_dtype: str) -> GPTModule:
    torch.manual_seed(4)
    model = {"vocab_size": pad_vocab(97), "context": 24, "d_model": 32, "n_layers": 2, "n_heads": 4}
    optimizer = {**MUON, "schedule": "wsd", "decay_steps": 6, "warmup_steps": 1}
    return GPTModule(model, {**optimizer, "muon_ns_dtype": ns_dtype})


@pytest.mark.parametrize("ns_dtype", NS_DTYPES)
def test_a_muon_run_resumed_from_its_checkpoint_continues_as_if_never_stopped(tmp_path, ns_dtype):
    straight = module(ns_dtype)
    trainer = fit(straight, 6)
    # `lr` is Muon's (the first group's): adam_lr's would be 3e-3 x the factor.
    assert trainer.callback_metrics["lr"].item() in [
        pytest.approx(0.02 * wsd_factor(s, 1, 6, 0.1, 0.2)) for s in range(4, 7)
    ]
    first = module(ns_dtype)
    fit(first, 3).save_checkpoint(tmp_path / "step3.ckpt")
    saved = torch.load(tmp_path / "step3.ckpt", weights_only=True)["optimizer_states"][0]
    kinds = [set(state) for state in saved["state"].values()]
    assert kinds.count({"momentum_buffer"}) == 8  # Muon's, one per block matrix
    assert kinds.count({"step", "exp_avg", "exp_avg_sq"}) == len(kinds) - 8  # AdamW's
    resumed = module(ns_dtype)
    fit(resumed, 6, ckpt_path=tmp_path / "step3.ckpt")
    for (name, a), b in zip(
        straight.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)
