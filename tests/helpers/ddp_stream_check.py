"""Run under torchrun by test_data_trainer.py: a real 2-process CPU DDP (gloo) fit from the stream.

Each rank writes how many steps it trained and the sample ids it trained on.
"""

import json
import sys
from pathlib import Path

import lightning as L

from streamgpt.data import StreamConfig, StreamDataModule, TokenizerConfig
from streamgpt.endings import StreamEndSync

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.helpers.tiny_lm import TinyLM


def main(url: str, workers: int, out: Path) -> None:
    cfg = StreamConfig(
        url=url,
        batch_size=4,
        max_length=32,
        valid_size=8,
        streaming_setup_samples=200,
        samples_per_request=4,
        num_workers=workers,
    )
    dm = StreamDataModule(cfg, TokenizerConfig(vocab_size=512), out / "run")
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=100_000,
        max_epochs=1,
        callbacks=[StreamEndSync(dm)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    model = TinyLM()
    trainer.fit(model, datamodule=dm)
    record = {"rank": trainer.global_rank, "steps": trainer.global_step, "ids": model.trained_ids}
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]))
