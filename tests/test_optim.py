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
from streamgpt.lit_module import GPTModule, pad_vocab
from streamgpt.model import GPT, GPTConfig
from streamgpt.optim import OptimizerConfig, build_optimizer, build_schedule, lr_factor, wsd_factor

MUON = {"name": "muon", "lr": 0.02, "adam_lr": 3e-3, "warmup_steps": 0}


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


@pytest.mark.parametrize("frozen", ["muon", "adamw"])
def test_muon_steps_the_blocks_matrices_and_adamw_everything_else(frozen):
    torch.manual_seed(0)
    model = small(bias=True, tie_embeddings=False)
    with torch.no_grad():  # zero at init: no gradient would reach the rest through it
        model.head.weight.normal_(std=0.02)
    opt = build_optimizer(model, OptimizerConfig(**MUON, weight_decay=0.1), "cpu")
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


def test_a_muon_update_of_a_matrix_is_orthogonalised():
    """Newton-Schulz sends every singular value of the momentum to about the same size (within
    ~0.6-1 of the largest here), where the gradient's own spread over a factor of 50."""
    torch.manual_seed(1)
    model = small()
    opt = build_optimizer(model, OptimizerConfig(**MUON, weight_decay=0.0), "cpu")
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


def test_muon_lowers_the_loss_of_a_fixed_batch():
    torch.manual_seed(2)
    model = small()
    opt = build_optimizer(model, OptimizerConfig(**MUON, weight_decay=0.0), "cpu")
    x, y = batch()
    losses = []
    for _ in range(12):
        opt.zero_grad()
        loss = model(x, y)[1]
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 4.0 and losses[-1] < losses[0] - 0.8, losses


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


def module() -> GPTModule:
    torch.manual_seed(4)
    model = {"vocab_size": pad_vocab(97), "context": 24, "d_model": 32, "n_layers": 2, "n_heads": 4}
    optimizer = {**MUON, "schedule": "wsd", "decay_steps": 6, "warmup_steps": 1}
    return GPTModule(model, optimizer)


def test_a_muon_run_resumed_from_its_checkpoint_continues_as_if_never_stopped(tmp_path):
    straight = module()
    trainer = fit(straight, 6)
    # `lr` is Muon's (the first group's): adam_lr's would be 3e-3 x the factor.
    assert trainer.callback_metrics["lr"].item() in [
        pytest.approx(0.02 * wsd_factor(s, 1, 6, 0.1, 0.2)) for s in range(4, 7)
    ]
    first = module()
    fit(first, 3).save_checkpoint(tmp_path / "step3.ckpt")
    saved = torch.load(tmp_path / "step3.ckpt", weights_only=True)["optimizer_states"][0]
    kinds = [set(state) for state in saved["state"].values()]
    assert kinds.count({"momentum_buffer"}) == 8  # Muon's, one per block matrix
    assert kinds.count({"step", "exp_avg", "exp_avg_sq"}) == len(kinds) - 8  # AdamW's
    resumed = module()
    fit(resumed, 6, ckpt_path=tmp_path / "step3.ckpt")
    for (name, a), b in zip(
        straight.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)
