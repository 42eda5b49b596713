"""Lightning callbacks: what a researcher watches while a model trains from a stream.

- SampleGenerations: text from fixed prompts and unconditional samples every `every` steps.
- LossCurve: training_curve_LOSS.png (train and validation loss against steps and tokens).
- StepCheckpoint: checkpoints every `every` steps, the best n by val/loss plus last.ckpt (and
  the final step's).
- StepProgressBar: optimizer steps out of max_steps (resumed runs too), not epochs.
How a run measures itself is in monitors.py, how it ends early in endings.py.
All files are written atomically (a temporary file renamed into place).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import WandbLogger
from tokenizers import Tokenizer

from streamgpt.atomic import replacing, write_atomic

log = logging.getLogger("streamgpt")


def _wandb_loggers(trainer: L.Trainer) -> list[WandbLogger]:
    """The trainer's W&B loggers: tables and images go through them, at the global step."""
    return [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]


class SampleGenerations(L.Callback):
    """Every `every` steps on rank 0: each prompt's continuation and `n_auto` samples from
    scratch (after an end-of-text token, i.e. a new document), written to
    <run>/samples/iter_<step>/{manual,auto}_<i>.txt and to a W&B table that grows over the run.
    Sampling uses the uncompiled model and a fixed seed per sample, so steps compare fairly."""

    def __init__(
        self,
        run_dir: str | Path,
        tokenizer: Tokenizer,
        eos_id: int,
        every: int,
        prompts: list[str],
        n_auto: int = 1,
        max_new_tokens: int = 64,
        temperature: float = 0.8,
        top_k: int | None = 50,
        top_p: float | None = 0.95,
        seed: int = 0,
    ) -> None:
        self.dir = Path(run_dir) / "samples"
        self.tokenizer, self.eos_id = tokenizer, eos_id
        self.every = every
        self.prompts = list(prompts)
        self.n_auto = n_auto
        self.max_new_tokens = max_new_tokens
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.seed = seed
        self.rows: list[list[Any]] = []
        self._last_step = -1

    def on_train_batch_end(self, trainer, pl_module, *args: Any) -> None:
        step = trainer.global_step
        if self.every > 0 and step % self.every == 0 and step != self._last_step:
            self.sample(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step != self._last_step:
            self.sample(trainer, pl_module)

    @torch.no_grad()
    def sample(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[list[Any]]:
        self._last_step = step = trainer.global_step
        if not trainer.is_global_zero:
            return []
        tokenizer, eos = self.tokenizer, self.eos_id
        model = pl_module.gpt  # never the compiled wrapper: it would recompile for every length
        was_training = model.training
        model.eval()
        folder = self.dir / f"iter_{step}"
        folder.mkdir(parents=True, exist_ok=True)
        rows = []
        jobs = [("manual", i, p) for i, p in enumerate(self.prompts)]
        jobs += [("auto", i, "") for i in range(self.n_auto)]
        try:
            for n, (kind, i, prompt) in enumerate(jobs):
                ids = tokenizer.encode(prompt, add_special_tokens=False).ids if prompt else []
                generator = torch.Generator(model.tok_emb.weight.device).manual_seed(self.seed + n)
                new = model.generate(
                    ids,
                    self.max_new_tokens,
                    temperature=self.temperature,
                    top_k=self.top_k,
                    top_p=self.top_p,
                    eos_id=eos,
                    generator=generator,
                )
                text = tokenizer.decode(ids + new)
                write_atomic(folder / f"{kind}_{i}.txt", text.encode())
                rows.append([step, kind, prompt, text])
        finally:
            model.train(was_training)
        self.rows += rows
        for logger in _wandb_loggers(trainer):
            logger.log_table("samples", ["step", "kind", "prompt", "text"], self.rows, step=step)
        return rows

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows = state.get("rows", [])


class LossCurve(L.Callback):
    """<run>/training_curve_LOSS.png: train and validation loss against steps (bottom axis) and
    tokens (top axis), redrawn every `every` steps and at the end, and logged to W&B."""

    def __init__(self, run_dir: str | Path, every: int) -> None:
        self.path = Path(run_dir) / "training_curve_LOSS.png"
        self.every = every
        self.train: list[tuple[int, int, float]] = []  # (step, tokens, loss)
        self.val: list[tuple[int, int, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        # Reading the loss syncs a GPU; once per logging interval is enough for a curve.
        if step % max(1, trainer.log_every_n_steps) == 0 and outputs is not None:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.train.append((step, pl_module.tokens_seen, float(loss)))
        if self.every > 0 and step % self.every == 0 and trainer.is_global_zero:
            self.draw(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or "val/loss" not in trainer.callback_metrics:
            return
        loss = float(trainer.callback_metrics["val/loss"])
        self.val.append((trainer.global_step, pl_module.tokens_seen, loss))

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self.draw(trainer)

    def draw(self, trainer: L.Trainer | None = None) -> Path | None:
        if not self.train and not self.val:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
        if self.train:
            steps, _, losses = zip(*self.train, strict=True)
            ax.plot(steps, losses, lw=1, label="train")
        if self.val:
            steps, _, losses = zip(*self.val, strict=True)
            ax.plot(steps, losses, "o-", ms=4, label="validation")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (cross-entropy, nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
        last = (self.train or self.val)[-1]
        per_step = last[1] / last[0] if last[0] else 0
        if per_step:
            top = ax.secondary_xaxis(
                "top", functions=(lambda s: s * per_step / 1e6, lambda t: t * 1e6 / per_step)
            )
            top.set_xlabel("tokens (millions)")
        fig.tight_layout()
        with replacing(self.path) as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)
        for logger in _wandb_loggers(trainer) if trainer is not None else []:
            logger.log_image("training_curve_LOSS", [str(self.path)], step=trainer.global_step)
        return self.path

    def state_dict(self) -> dict[str, Any]:
        return {"train": self.train, "val": self.val}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.train = [tuple(r) for r in state.get("train", [])]
        self.val = [tuple(r) for r in state.get("val", [])]


class StepCheckpoint(ModelCheckpoint):
    """A checkpoint every `every` steps: the best `n_saved` by val/loss, plus last.ckpt.

    Saved right after that step's validation, so the ranking uses the fresh val/loss (validation
    must run at those steps: `every` a multiple of the validation interval). Without validation,
    the newest checkpoint is kept. A run that ends between those steps (trainer.budget_s, or
    max_steps not a multiple of `every`) saves its final step too, so last.ckpt is what it ended
    with.
    """

    def __init__(self, dirpath: str | Path, every: int, n_saved: int, validation: bool) -> None:
        super().__init__(
            dirpath=dirpath,
            filename="step={step:07d}-val_loss={val/loss:.4f}" if validation else "step={step:07d}",
            monitor="val/loss" if validation else None,
            mode="min",
            save_top_k=n_saved if validation else 1,
            save_last=True,
            auto_insert_metric_name=False,
            every_n_train_steps=0,
            every_n_epochs=0,
            save_on_train_epoch_end=False,
        )
        self.every = every
        self.validation = validation
        self._validated = -1  # the step of the latest validation

    def _due(self, trainer: L.Trainer) -> bool:
        step = trainer.global_step
        return (
            self.every > 0
            and step > 0
            and step % self.every == 0
            and not trainer.sanity_checking
            and not self._should_skip_saving_checkpoint(trainer)
        )

    def _save_now(self, trainer: L.Trainer) -> None:
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)

    def on_train_batch_end(self, trainer, pl_module, *args: Any) -> None:
        if not self.validation and self._due(trainer):
            self._save_now(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        self._validated = trainer.global_step
        if self.validation and self._due(trainer):
            self._save_now(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        step = trainer.global_step
        if self.every <= 0 or step == 0 or self._should_skip_saving_checkpoint(trainer):
            return super().on_train_end(trainer, pl_module)
        if self.validation and self._validated != step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))  # not ranked
        else:
            self._save_now(trainer)  # e.g. a budget's stop: Lightning validated this step

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        pass  # a stream has no epochs worth a checkpoint


class StepProgressBar(RichProgressBar):
    """Optimizer steps out of `max_steps`, counting on from the checkpoint's step after a resume.

    Lightning's bar counts batches of epochs; a stream has one endless epoch ("Epoch 0/-2") and a
    resumed run would restart the count."""

    @property
    def total_train_batches(self) -> int:
        return self.trainer.max_steps

    def _get_train_description(self, current_epoch: int) -> str:
        return f"{'train':{len(self.validation_description)}}"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # The bar shows `batch_idx + 1` done: make that the global step.
        super().on_train_batch_end(trainer, pl_module, outputs, batch, trainer.global_step - 1)

    def get_metrics(self, trainer, pl_module) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the logger's version (a W&B run id) is not a metric
        return metrics
