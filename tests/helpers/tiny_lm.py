"""Small models for Trainer tests: TinyLM, the smallest LightningModule that trains on (x, y)
token batches and records what it saw, and a small GPTModule on a set-up StreamDataModule."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

from streamgpt.bpb import token_byte_lengths
from streamgpt.data import StreamDataModule, TokenizerConfig
from streamgpt.lit_module import GPTModule, pad_vocab


class TinyLM(L.LightningModule):
    def __init__(self, vocab_size: int | None = None, width: int = 16) -> None:
        super().__init__()
        self.width = width
        self.embed = self.head = None
        if vocab_size is not None:
            self._build(vocab_size)
        self.trained_ids: list[str] = []
        self.trained_x: list[torch.Tensor] = []

    def _build(self, vocab_size: int) -> None:
        self.embed = torch.nn.Embedding(vocab_size, self.width)
        self.head = torch.nn.Linear(self.width, vocab_size)

    def configure_model(self) -> None:
        # The vocabulary is known once the datamodule has its tokenizer (after setup).
        if self.embed is None:
            self._build(self.trainer.datamodule.vocab_size)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.head(self.embed(x)).flatten(0, 1), y.flatten())
        self.trained_ids += self.trainer.datamodule.last_ids
        self.trained_x.append(x.detach().cpu())
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", F.cross_entropy(self.head(self.embed(x)).flatten(0, 1), y.flatten()))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def small_gpt(url: str, run: Path) -> tuple[StreamDataModule, GPTModule]:
    """A StreamDataModule on `url`, set up (tokenizer trained), and a small GPTModule for its
    vocabulary: what train.py hands over, for a Trainer built in the test."""
    from .servers import stream_cfg

    dm = StreamDataModule(stream_cfg(url), TokenizerConfig(vocab_size=512), run)
    dm.prepare_data()
    dm.setup()
    model = GPTModule(
        {
            "context": 32,
            "d_model": 32,
            "n_layers": 2,
            "n_heads": 2,
            "vocab_size": pad_vocab(dm.vocab_size),
        },
        {"name": "adamw", "lr": 1e-3, "warmup_steps": 2},
    )
    model.set_token_bytes(token_byte_lengths(dm.tokenizer))  # as run.py does: val/bpb
    return dm, model
