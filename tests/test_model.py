"""BabyGPT: causality, cached generation, sizes, learning, checkpoints; the optimizers."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from streamgpt.checkpoints import load_gpt
from streamgpt.lit_module import GPTModule, pad_vocab
from streamgpt.model import (
    GPT,
    MLP,
    Attention,
    GPTConfig,
    Linear,
    apply_rotary,
    rotary_tables,
    sample,
)
from streamgpt.optim import Lion, OptimizerConfig, build_optimizer, lr_factor

CONF = Path(__file__).resolve().parents[1] / "conf"
VARIANTS = [
    {"positions": "learned", "mlp": "gelu", "norm": "layernorm"},
    {"positions": "rotary", "mlp": "swiglu", "norm": "rmsnorm"},
    {"positions": "rotary", "mlp": "relu2", "norm": "rmsnorm", "qk_norm": True},
]


def small(**overrides) -> GPTConfig:
    options = {"vocab_size": 97, "context": 24, "d_model": 32, "n_layers": 2, "n_heads": 4}
    return GPTConfig(**{**options, **overrides})


def model_configs() -> list[Path]:
    return sorted((CONF / "model").glob("*.yaml"))


def build(path: Path, vocab: int = 8192) -> GPT:
    cfg = yaml.safe_load(path.read_text())
    cfg.pop("compile")
    cfg.pop("init_from")
    cfg["vocab_size"] = cfg["vocab_size"] or vocab
    return GPT(GPTConfig(**cfg))


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_future_token_never_changes_earlier_logits(variant):
    torch.manual_seed(0)
    model = GPT(small(**variant)).eval()
    idx = torch.randint(0, 97, (2, 24))
    logits, _ = model(idx)
    for t in (0, 7, 23):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % 97
        after, _ = model(changed)
        assert torch.allclose(after[:, :t], logits[:, :t], atol=1e-6)
        assert not torch.allclose(after[:, t], logits[:, t])


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("prompt_len", [1, 5, 40])
def test_cached_generation_equals_full_recompute_token_for_token(variant, prompt_len):
    torch.manual_seed(1)
    model = GPT(small(**variant)).eval()
    prompt = torch.randint(0, 97, (prompt_len,)).tolist()  # 40 > context: cropped
    cached = model.generate(prompt, 50, temperature=0)  # runs past the context of 24
    recomputed = model.generate(prompt, 50, temperature=0, use_cache=False)
    assert cached == recomputed and len(cached) == 50


def rms(t: torch.Tensor) -> torch.Tensor:
    return t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6)


def test_qk_norm_attends_with_rms_normalised_queries_and_keys_of_each_head():
    torch.manual_seed(7)
    B, T, C, H, hd = 2, 10, 32, 4, 8
    attn = Attention(small(qk_norm=True, bias=True))
    with torch.no_grad():
        attn.qkv.bias.normal_()  # zero at init: not a test of the bias
    x = torch.randn(B, T, C)
    q, k, v = (x @ attn.qkv.weight.T + attn.qkv.bias).split(C, dim=-1)
    q, k, v = (t.view(B, T, H, hd).transpose(1, 2) for t in (q, k, v))
    scores = rms(q) @ rms(k).transpose(-1, -2) / math.sqrt(hd)
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    heads = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C)
    expected = heads @ attn.proj.weight.T + attn.proj.bias
    torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-5)
    plain = Attention(small(qk_norm=False, bias=True))
    plain.load_state_dict(attn.state_dict())
    assert not torch.allclose(plain(x), expected, atol=1e-3)
    # Before or after rotary is the same: a rotation keeps each head's norm.
    cos, sin = rotary_tables(small(), T)
    torch.testing.assert_close(apply_rotary(rms(q), cos, sin), rms(apply_rotary(q, cos, sin)))


def test_the_relu2_mlp_is_down_of_the_square_of_relu_of_up():
    torch.manual_seed(8)
    mlp = MLP(small(mlp="relu2", bias=True))
    with torch.no_grad():
        mlp.up.bias.normal_()
        mlp.down.bias.normal_()
    assert mlp.up.weight.shape == (128, 32), "two matrices of mlp_ratio x d_model, as GELU's"
    x = torch.randn(3, 5, 32)
    hidden = x @ mlp.up.weight.T + mlp.up.bias
    expected = torch.where(hidden > 0, hidden * hidden, 0.0) @ mlp.down.weight.T + mlp.down.bias
    torch.testing.assert_close(mlp(x), expected, atol=1e-5, rtol=1e-5)


def test_an_untied_head_is_a_parameter_of_its_own_and_it_and_the_embedding_both_learn():
    torch.manual_seed(9)
    tied, untied = GPT(small()), GPT(small(tie_embeddings=False))
    assert tied.head.weight is tied.tok_emb.weight
    assert untied.head.weight is not untied.tok_emb.weight
    assert untied.num_params() - tied.num_params() == 97 * 32  # vocab x d_model
    # The embedding is a lookup (no FLOPs); the head's matmul is counted once either way.
    assert untied.flops_per_token() == tied.flops_per_token()
    x, y = torch.randint(0, 97, (4, 24)), torch.randint(0, 97, (4, 24))
    assert not untied.head.weight.any(), "zero at init (modded-nanogpt)"
    assert untied(x, y)[1].item() == pytest.approx(math.log(97), abs=1e-5)
    before = {k: v.clone() for k, v in untied.state_dict().items()}
    opt = build_optimizer(untied, OptimizerConfig(lr=1e-2, weight_decay=0.0), "cpu")
    for _ in range(3):
        opt.zero_grad()
        untied(x, y)[1].backward()
        opt.step()
    for name in ("head.weight", "tok_emb.weight"):
        assert not torch.equal(untied.state_dict()[name], before[name]), name
    assert not torch.equal(untied.head.weight, untied.tok_emb.weight)
    reloaded = GPT(small(tie_embeddings=False))
    reloaded.load_state_dict(untied.state_dict())
    assert torch.equal(reloaded(x)[0], untied(x)[0])


@pytest.mark.parametrize("bias", [True, False])
def test_the_cpu_bfloat16_linear_has_the_gradients_of_nn_linear(bias):
    torch.manual_seed(6)
    ours = Linear(48, 40, bias=bias)
    plain = torch.nn.Linear(48, 40, bias=bias)
    plain.load_state_dict(ours.state_dict())
    x1 = torch.randn(3, 7, 48, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y1, y2 = ours(x1), plain(x2)
    assert y1.dtype == y2.dtype == torch.bfloat16
    g = torch.randn_like(y1, dtype=torch.float32)
    y1.float().backward(g)
    y2.float().backward(g)
    assert torch.equal(y1, y2)
    for a, b in [(x1.grad, x2.grad), (ours.weight.grad, plain.weight.grad)]:
        assert torch.allclose(a, b, rtol=2e-2, atol=2e-2)
    if bias:
        assert torch.allclose(ours.bias.grad, plain.bias.grad, rtol=2e-2, atol=2e-2)


def test_sampling_is_seeded_and_stops_at_the_end_token():
    torch.manual_seed(2)
    model = GPT(small()).eval()
    runs = [
        model.generate([3, 4], 30, generator=torch.Generator().manual_seed(7)) for _ in range(2)
    ]
    assert runs[0] == runs[1]
    greedy = model.generate([3, 4], 30, temperature=0)
    assert model.generate([3, 4], 30, top_k=1) == greedy
    assert model.generate([3, 4], 30, top_p=1e-6) == greedy
    first = greedy[0]
    assert model.generate([3, 4], 30, temperature=0, eos_id=first) == []
    with pytest.raises(ValueError, match="empty prompt needs eos_id"):
        model.generate([], 5)
    assert len(model.generate([], 5, temperature=0, eos_id=96)) <= 5


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    draws = {
        sample(logits, top_p=0.7, generator=torch.Generator().manual_seed(s)) for s in range(200)
    }
    assert draws == {0, 1}


@pytest.mark.parametrize("path", model_configs(), ids=lambda p: p.stem)
def test_every_model_config_builds(path):
    model = build(path)
    assert model.num_params() > 0 and model.flops_per_token() > 6 * model.num_params()


def test_gpt2_small_has_124m_parameters():
    model = build(CONF / "model" / "gpt2-small.yaml")
    assert abs(model.num_params(exclude_positions=False) - 124e6) / 124e6 < 0.01


def test_babygpt_matches_eir_tutorial_02_and_its_flops_are_as_written():
    model = build(CONF / "model" / "babygpt.yaml")
    cfg = model.cfg
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.context) == (512, 4, 8, 512)
    assert cfg.dropout == 0 and cfg.positions == "learned"
    # BENCHMARKS.md's arithmetic: 6N + 12 L d T with N = blocks + tied embedding.
    assert model.flops_per_token() == pytest.approx(113.2e6, rel=0.002)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"d_model": 30, "n_heads": 4}, "not divisible by model.n_heads=4"),
        ({"mlp": "relu"}, "model.mlp must be one of"),
        ({"mlp": "relu3"}, r"\['gelu', 'swiglu', 'relu2'\]"),
        ({"positions": "sinusoidal"}, "model.positions must be one of"),
        ({"dropout": 1.0}, "model.dropout"),
        ({"loss_chunk": -1}, "model.loss_chunk must be >= 0"),
    ],
)
def test_bad_model_configs_are_refused_naming_the_key(bad, message):
    with pytest.raises(ValueError, match=message):
        small(**bad)


def test_a_sequence_longer_than_the_context_is_refused():
    with pytest.raises(ValueError, match="exceeds the context of 24"):
        GPT(small())(torch.zeros(1, 25, dtype=torch.long))


@pytest.mark.parametrize("name", ["adamw", "lion"])
def test_a_fixed_batch_is_memorised(name):
    torch.manual_seed(3)
    model = GPT(small(dropout=0.0))
    lr = 3e-3 if name == "adamw" else 1e-3
    opt = build_optimizer(model, OptimizerConfig(name=name, lr=lr, weight_decay=0.0), "cpu")
    x = torch.randint(0, 97, (4, 24))
    y = torch.randint(0, 97, (4, 24))
    for _ in range(400):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.1:
            break
    assert loss.item() < 0.1


def test_weight_decay_goes_to_matrices_only():
    model = GPT(small(bias=True))
    opt = build_optimizer(model, OptimizerConfig(weight_decay=0.1), "cpu")
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decayed["params"]) and all(
        p.dim() < 2 for p in plain["params"]
    )
    assert isinstance(build_optimizer(model, OptimizerConfig(name="lion"), "cpu"), Lion)


def test_the_schedule_warms_up_then_decays_to_its_floor():
    factors = [lr_factor(s, warmup=10, decay=100, floor=0.1) for s in range(120)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(factors[10:]))
    assert factors[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert factors[100:] == [0.1] * 20


def test_bad_optimizer_configs_are_refused():
    with pytest.raises(ValueError, match=r"optimizer\.name must be one of"):
        OptimizerConfig(name="adam")
    with pytest.raises(ValueError, match=r"optimizer\.betas"):
        OptimizerConfig(betas=[0.9, 1.5])


def _lit(compile: bool = False) -> GPTModule:
    model = {"vocab_size": pad_vocab(97), "context": 24, "d_model": 32, "n_layers": 2, "n_heads": 4}
    return GPTModule(model, {"name": "adamw"}, compile=compile)


def test_a_saved_lit_module_loads_with_identical_logits(tmp_path):
    torch.manual_seed(4)
    lit = _lit()
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False)
    trainer.strategy.connect(lit)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    loaded = GPTModule.load_from_checkpoint(tmp_path / "m.ckpt")
    idx = torch.randint(0, 97, (2, 24))
    assert torch.equal(lit.gpt(idx)[0], loaded.gpt(idx)[0])
    assert all(not k.startswith("_") and "_orig_mod" not in k for k in lit.state_dict())


@pytest.mark.slow
def test_a_compiled_models_checkpoint_loads_into_an_uncompiled_one(tmp_path):
    torch.manual_seed(5)
    lit = _lit(compile=True)
    idx = torch.randint(0, 97, (2, 24))
    compiled_logits = lit(idx)[0]  # runs the compiled forward
    assert all("_orig_mod" not in k for k in lit.state_dict())
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False)
    trainer.strategy.connect(lit)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    state = torch.load(tmp_path / "m.ckpt", weights_only=True)
    plain = _lit(compile=False)
    plain.load_state_dict(state["state_dict"])
    assert torch.allclose(plain.gpt(idx)[0], compiled_logits, atol=1e-5)


def test_a_checkpoint_written_before_the_speedrun_options_loads_as_it_was(tmp_path):
    """Checkpoints whose model config has no qk_norm or tie_embeddings: tied, no QK-norm."""
    torch.manual_seed(10)
    lit = _lit()
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False)
    trainer.strategy.connect(lit)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    state = torch.load(tmp_path / "m.ckpt", weights_only=True)
    for key in ("qk_norm", "tie_embeddings"):
        del state["hyper_parameters"]["model"][key]
    torch.save(state, tmp_path / "old.ckpt")
    model, _ = load_gpt(tmp_path / "old.ckpt")
    assert model.head.weight is model.tok_emb.weight and not model.cfg.qk_norm
    idx = torch.randint(0, 97, (2, 24))
    assert torch.equal(model(idx)[0], lit.gpt.eval()(idx)[0])
