"""Hugging Face both ways: real train.py runs exported with scripts/export_hf.py and loaded by
transformers (same logits, same greedy text, same token ids), and a saved GPT2LMHeadModel
imported with model.init_from. Offline: nothing here reaches the hub."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from tokenizers import Tokenizer
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
)
from transformers.activations import ACT2FN

from streamgpt.config import gpt_fields, register_configs, validate
from streamgpt.data import tokenizer as tokenizers
from streamgpt.hf import architecture, export, hf_config, read_checkpoint
from streamgpt.lit_module import GPTModule
from streamgpt.model import GPT, GPTConfig
from streamgpt.run import fresh_init

from .helpers.runs import REPO, environment, start

CONF = REPO / "conf"
# A few steps at a high learning rate: weights far enough from their init that a wrong mapping
# (a transposed matrix, unpermuted rotary rows, the tanh GELU) shows in the logits.
TRAIN = [
    "model=babygpt-tiny",  # GPT-2-shaped; the mappings below make the Llama one
    "optimizer=adamw",
    "model.d_model=32",
    "model.context=48",
    "data.stream.max_length=48",
    "trainer.max_steps=8",
    "trainer.val_every=4",
    "callbacks.checkpoint_every=4",
    "callbacks.sample_every=8",
    "data.stream.valid_size=8",
    "optimizer.lr=3e-3",
    "optimizer.warmup_steps=1",
    "peak_flops=1e12",
]
MAPPINGS = {
    "GPT2LMHeadModel": ["model.bias=false"],
    "LlamaForCausalLM": [
        "model.positions=rotary",
        "model.norm=rmsnorm",
        "model.mlp=swiglu",
        "model.bias=true",  # Llama's attention_bias / mlp_bias, q and k biases permuted too
    ],
}
TEXT = "Steven, what say you to the king?"


def export_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "scripts/export_hf.py", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=environment(),
    )


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    """One tiny trained run per mapping (trained side by side), each exported to <run>/hf."""
    root = tmp_path_factory.mktemp("hf")
    runs = {name: root / name for name in MAPPINGS}
    procs = {name: start(runs[name], *TRAIN, *extra) for name, extra in MAPPINGS.items()}
    for name, proc in procs.items():
        assert proc.wait(timeout=300) == 0, Path(f"{runs[name]}.out").read_text()[-3000:]
    for name, run in runs.items():
        result = export_script(run)
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"({name})" in result.stdout
    return runs


def ours(run: Path) -> tuple[GPT, int]:
    checkpoint = min(
        (run / "checkpoints").glob("step=*-val_loss=*.ckpt"),
        key=lambda p: float(p.stem.split("=")[-1]),
    )
    cfg, weights, eos = read_checkpoint(checkpoint)
    model = GPT(cfg)
    model.load_state_dict(weights)
    return model.eval(), Tokenizer.from_file(str(run / "tokenizer.json")).token_to_id(eos)


@pytest.mark.slow  # two short train.py runs (~40 s on 2 idle cores, shared by these tests)
@pytest.mark.parametrize("name", list(MAPPINGS))
def test_an_exported_run_gives_our_logits_and_greedy_text_in_transformers(exported, name):
    run = exported[name]
    model, eos = ours(run)
    theirs = AutoModelForCausalLM.from_pretrained(run / "hf", local_files_only=True).eval()
    assert type(theirs).__name__ == name
    assert theirs.config.vocab_size == model.cfg.vocab_size  # the padded rows kept
    ids = Tokenizer.from_file(str(run / "tokenizer.json")).encode(TEXT).ids
    prompt = torch.tensor([ids])
    with torch.no_grad():
        mine, _ = model(prompt)
        their_logits = theirs(prompt).logits
    torch.testing.assert_close(their_logits, mine, atol=1e-4, rtol=0)
    new = model.generate(ids, 24, temperature=0, eos_id=eos)
    generated = theirs.generate(prompt, max_new_tokens=24, do_sample=False)[0, len(ids) :]
    generated = generated.tolist()
    assert generated[: len(new)] == new
    assert len(generated) == len(new) or generated[len(new)] == eos


@pytest.mark.slow  # two short train.py runs (~40 s on 2 idle cores, shared by these tests)
@pytest.mark.parametrize("name", list(MAPPINGS))
def test_auto_tokenizer_loads_the_runs_tokenizer_with_its_special_tokens(exported, name):
    run = exported[name]
    tokenizer = AutoTokenizer.from_pretrained(run / "hf", local_files_only=True)
    mine = Tokenizer.from_file(str(run / "tokenizer.json"))
    text = f"{TEXT}<|endoftext|>And thou?"
    assert tokenizer(text)["input_ids"] == mine.encode(text).ids
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token == "<|pad|>"
    config = AutoModelForCausalLM.from_pretrained(run / "hf", local_files_only=True).config
    assert config.eos_token_id == mine.token_to_id("<|endoftext|>") == tokenizer.eos_token_id
    assert config.pad_token_id == mine.token_to_id("<|pad|>") == tokenizer.pad_token_id


@pytest.mark.slow  # two short train.py runs (~40 s on 2 idle cores, shared by these tests)
def test_export_refuses_a_truncated_checkpoint_in_one_line(exported, tmp_path):
    source = exported["GPT2LMHeadModel"] / "checkpoints" / "last.ckpt"
    cut = tmp_path / "checkpoints" / "last.ckpt"
    cut.parent.mkdir()
    cut.write_bytes(source.read_bytes()[: source.stat().st_size // 3])
    result = export_script(cut)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert f"{cut} is truncated" in result.stderr
    assert not (tmp_path / "hf").exists()


def test_the_exported_gpt2_activation_is_our_exact_gelu():
    """GPT-2's default gelu_new (tanh) is off by up to ~5e-4: too little to show in the logits of
    a barely trained model, so the activation itself is compared."""
    config = hf_config(GPTConfig(vocab_size=64), "gpt2", {})
    x = torch.linspace(-6, 6, 2001)
    assert torch.equal(ACT2FN[config["activation_function"]](x), F.gelu(x))
    assert config["layer_norm_epsilon"] == torch.nn.LayerNorm(4).eps


def test_a_shape_no_hugging_face_architecture_computes_is_refused_naming_the_fields():
    cfg = GPTConfig(vocab_size=64, positions="rotary", norm="layernorm", mlp="gelu")
    with pytest.raises(ValueError, match=r"model.positions=rotary, model.norm=layernorm") as e:
        architecture(cfg)
    assert "positions=learned, norm=layernorm, mlp=gelu or relu2 (GPT-2)" in str(e.value)
    assert "positions=rotary, norm=rmsnorm, mlp=swiglu (Llama)" in str(e.value)
    with pytest.raises(ValueError, match=r"model.qk_norm=true: neither GPT-2 nor Llama"):
        architecture(GPTConfig(vocab_size=64, qk_norm=True))


@pytest.mark.parametrize(
    ("shape", "name"),
    [
        ({"mlp": "relu2"}, "GPT2LMHeadModel"),
        ({"positions": "rotary", "norm": "rmsnorm", "mlp": "swiglu"}, "LlamaForCausalLM"),
    ],
)
def test_an_untied_head_exports_as_its_own_lm_head_with_our_logits(tmp_path, shape, name):
    """model.tie_embeddings=false (and ReLU^2 for GPT-2): a checkpoint as a run writes it,
    exported, gives our logits in transformers (weights moved off their init first)."""
    torch.manual_seed(11)
    model = {"vocab_size": 320, "context": 16, "d_model": 32, "n_layers": 2, "n_heads": 4}
    lit = GPTModule({**model, **shape, "tie_embeddings": False}, {"name": "adamw"})
    with torch.no_grad():
        for p in lit.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False)
    trainer.strategy.connect(lit)
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    trainer.save_checkpoint(checkpoint)
    tokenizers.train_bpe(["a few words"] * 20, 300, 1, "<|endoftext|>", "<|pad|>").save(
        str(tmp_path / "run" / "tokenizer.json")
    )
    assert export(checkpoint, tmp_path / "hf") == name
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    assert not theirs.config.tie_word_embeddings
    assert theirs.get_output_embeddings().weight.data_ptr() != (
        theirs.get_input_embeddings().weight.data_ptr()
    )
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, lit.gpt.eval()(ids)[0], atol=1e-4, rtol=0)


# -- the way in: model.init_from ------------------------------------------------------------------

HF_SIZE = {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 40, "vocab_size": 100}
OURS = [
    "model=babygpt-tiny",
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.context=40",
]
GPT2_SHAPED = ["model.bias=true", "data.stream.max_length=40", "model.vocab_size=128"]


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory) -> Path:
    """A randomly initialised GPT-2 as save_pretrained writes it, biases and all made non-zero."""
    torch.manual_seed(0)
    config = GPT2Config(**HF_SIZE, activation_function="gelu")
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:  # zeros and ones at init: not a test
                p.add_(torch.randn_like(p) * 0.1)
    folder = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(folder)
    return folder


def compose_train(overrides: list[str]):
    register_configs(CONF)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides)


def test_init_from_a_gpt2_folder_gives_its_logits_in_our_model(gpt2_folder):
    cfg = compose_train([*OURS, *GPT2_SHAPED, f"model.init_from={gpt2_folder}"])
    validate(cfg)
    module = GPTModule(
        gpt_fields(cfg.model),
        OmegaConf.to_container(cfg.optimizer),
        init_from=cfg.model.init_from,
    )
    assert "init_from" not in module.hparams  # a checkpoint never reloads the folder
    theirs = GPT2LMHeadModel.from_pretrained(gpt2_folder, local_files_only=True).eval()
    ids = torch.randint(
        0, HF_SIZE["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        mine, _ = module.gpt.eval()(ids)
        expected = theirs(ids).logits
    torch.testing.assert_close(mine[..., : HF_SIZE["vocab_size"]], expected, atol=1e-4, rtol=0)
    fresh = GPTModule(gpt_fields(cfg.model), OmegaConf.to_container(cfg.optimizer))
    assert not torch.equal(fresh.gpt.tok_emb.weight[:100], module.gpt.tok_emb.weight[:100])


def test_init_from_is_for_a_fresh_run_only():
    assert fresh_init("hf-folder", None) == "hf-folder"
    assert fresh_init("hf-folder", "run/checkpoints/last.ckpt") is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["model.d_model=64", "model.context=48"],
            "model.d_model=64 but the folder's is 32, model.context=48 but the folder's is 40; "
            "set model.d_model=32 model.context=40",
        ),
        (["model.bias=false"], "the model must be GPT-2-shaped, set model.bias=true"),
        (["model.positions=rotary"], "set model.positions=learned"),
        (["model.qk_norm=true"], "set model.qk_norm=false"),
        (["model.vocab_size=64"], "has 100 token rows, more than model.vocab_size=64"),
    ],
)
def test_init_from_a_folder_that_does_not_fit_is_refused_naming_the_fix(
    gpt2_folder, overrides, message
):
    cfg = compose_train([*OURS, *GPT2_SHAPED, f"model.init_from={gpt2_folder}", *overrides])
    with pytest.raises(ValueError, match=r"model.init_from=") as e:
        validate(cfg)
    assert message in str(e.value)


def test_init_from_refuses_a_folder_that_is_not_gpt2(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    cfg = compose_train([*OURS, *GPT2_SHAPED, f"model.init_from={tmp_path}"])
    with pytest.raises(ValueError, match="holds a 'llama' model; only GPT-2"):
        validate(cfg)
    cfg = compose_train([*OURS, *GPT2_SHAPED, f"model.init_from={tmp_path / 'nothing'}"])
    with pytest.raises(ValueError, match="nothing: no such folder"):
        validate(cfg)
