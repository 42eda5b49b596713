"""GPTModule: the GPT of model.py (BabyGPT, GPT-2 small) trained by Lightning, with the metrics
a researcher reads.

Logs train/loss, val/loss, val/ppl, val/bpb (bits per byte, bpb.py; once run.py hands over the
tokenizer's byte lengths), lr and tokens_seen, all at the trainer's global step (the
`step` it logs beside them is the step Lightning hands its loggers); monitors.ThroughputMonitor
adds perf/tokens_per_s and perf/mfu. With `compile=True` the forward pass is `torch.compile`d, but
the compiled wrapper is kept out of the module tree: checkpoints hold plain `model.*` keys and
generation runs the uncompiled module.

Validation batches of a mixture carry each window's component index, (x, y, component): then
val/loss/<component> and val/bpb/<component> too, named by the datamodule's `val_components`,
from the same single reduction as val/loss.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict
from typing import Any

import lightning as L
import torch

from streamgpt.bpb import bits_per_byte, nll_sums_by_group, token_nll_sums
from streamgpt.hf_init import init_from_gpt2
from streamgpt.model import GPT, GPTConfig
from streamgpt.optim import Clock, OptimizerConfig, build_optimizer, build_schedule
from streamgpt.perf import STARTUP

log = logging.getLogger("streamgpt")


def pad_vocab(n: int, multiple: int = 64) -> int:
    """Embedding rows rounded up to a multiple of 64: faster matmuls, a few unused rows."""
    return -(-n // multiple) * multiple


class GPTModule(L.LightningModule):
    """`model`: GPTConfig's fields, `vocab_size` included (run.py takes it from the run's
    tokenizer; a checkpoint knows its own); `eos_token`: the tokenizer's end-of-text token, kept
    in checkpoints for scripts/generate.py; `init_from`: a local Hugging Face GPT-2 folder the
    model starts from (hf_init.py; run.py gives it to a fresh run only; not a hyperparameter: a
    checkpoint never reloads it)."""

    def __init__(
        self,
        model: dict[str, Any],
        optimizer: dict[str, Any],
        compile: bool = False,
        eos_token: str | None = None,
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["init_from"])
        self.optim_cfg = OptimizerConfig(**optimizer)
        self.model: GPT | None = None
        self.tokens_seen = 0
        self.hooks_done: float | None = None
        # A wall-clock budget's clock (endings.TimeBudget, set by run.py): the lr follows time.
        self.clock: Clock | None = None
        self._val_sum = self._val_count = 0.0
        self._val_bytes: torch.Tensor | None = None  # bpb.nll_sums, summed over the batches
        self._val_names: list[str] = []  # a mixture's components with validation windows
        self._val_parts: torch.Tensor | None = None  # their bpb.nll_sums_by_group, summed
        # Bytes per token id, for val/bpb (set_token_bytes). Not persistent: checkpoints are
        # unchanged by it, and ones written before it existed load as they did.
        self.register_buffer("token_bytes", None, persistent=False)
        if model.get("vocab_size"):
            self._build(model)
        if init_from:
            if self.model is None:
                raise ValueError("model.init_from needs model.vocab_size to build the model")
            init_from_gpt2(self.model, init_from)

    # -- building ----------------------------------------------------------------------------

    def _build(self, model_cfg: dict[str, Any]) -> None:
        cfg = GPTConfig(**model_cfg)
        self.model = GPT(cfg)
        self.hparams["model"] = asdict(cfg)  # the checkpoint rebuilds exactly this model
        if self.hparams.compile:
            # Not an attribute Lightning or nn.Module would register: no `_orig_mod.` keys.
            object.__setattr__(self, "_compiled", torch.compile(self.model))
        else:
            object.__setattr__(self, "_compiled", self.model)

    def configure_model(self) -> None:
        if self.model is None:
            raise ValueError("GPTModule needs model.vocab_size (the run's tokenizer's, padded)")
        STARTUP.mark("model build")

    def set_token_bytes(self, byte_lengths: torch.Tensor) -> None:
        """The UTF-8 bytes of each token id (bpb.token_byte_lengths): validation logs val/bpb."""
        self.token_bytes = byte_lengths.to(torch.int64)

    @property
    def gpt(self) -> GPT:
        assert self.model is not None, "the model is built in configure_model (or give vocab_size)"
        return self.model

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, reduction="mean"):
        return self._compiled(idx, targets, reduction=reduction)

    # -- steps -------------------------------------------------------------------------------

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        _, loss = self(x, y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        x, _ = batch
        self.tokens_seen += x.numel() * self.trainer.world_size
        self.log("tokens_seen", float(self.tokens_seen))
        self.log("lr", self.optimizers().param_groups[0]["lr"])
        self.log("step", float(self.global_step))  # optimizer steps done: every logger's step
        # Module hooks run after every callback's: from here on the step's own work is done
        # (perf/data_wait_s and perf/tokens_per_s count from this moment; ThroughputMonitor).
        self.hooks_done = time.perf_counter()

    def on_validation_end(self) -> None:
        self.hooks_done = time.perf_counter()

    def on_validation_epoch_start(self) -> None:
        self._val_sum = self._val_count = 0.0
        self._val_bytes = self._val_parts = None
        datamodule = getattr(self.trainer, "datamodule", None)
        self._val_names = list(getattr(datamodule, "val_components", None) or [])

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y, *component = batch
        _, nll = self(x, y, reduction="none")  # each target's; no logits with model.loss_chunk
        loss = nll.mean()
        self._val_sum += loss.detach() * x.size(0)
        self._val_count += x.size(0)
        if component and self._val_names:
            self._validate_components(nll.detach(), y, component[0])
        if self.token_bytes is not None:
            sums = token_nll_sums(nll.detach(), y, self.token_bytes)
            self._val_bytes = sums if self._val_bytes is None else self._val_bytes + sums

    def _validate_components(
        self, nll: torch.Tensor, y: torch.Tensor, component: torch.Tensor
    ) -> None:
        sums = nll_sums_by_group(nll, y, self.token_bytes, component, len(self._val_names))
        self._val_parts = sums if self._val_parts is None else self._val_parts + sums

    def on_validation_epoch_end(self) -> None:
        if not self._val_count:
            return
        sums = [torch.as_tensor(self._val_sum), torch.as_tensor(float(self._val_count))]
        if self._val_bytes is not None:  # NLL of the byte-bearing targets, and their bytes
            sums += [self._val_bytes[2].float(), self._val_bytes[3].float()]
        head = len(sums)
        if self._val_names:  # every rank has the rows, if not windows, of every component
            parts = self._val_parts
            if parts is None:
                parts = torch.zeros(len(self._val_names), 4, dtype=torch.float64)
            sums += list(parts.flatten())
        # One reduction across ranks for all of them, in float32 as val/loss always was.
        total = self.trainer.strategy.reduce(
            torch.stack([s.to(self.device, torch.float32) for s in sums]), reduce_op="sum"
        )
        loss = (total[0] / total[1]).item()
        # Perplexity of the mean loss (not the mean of per-batch perplexities).
        self.log("val/loss", loss, sync_dist=False)
        self.log("val/ppl", math.exp(min(loss, 50.0)), sync_dist=False)
        if head == 4:
            self.log("val/bpb", bits_per_byte(total[2].item(), total[3].item()), sync_dist=False)
        for c, name in enumerate(self._val_names):
            nll, targets, nll_bytes, n_bytes = total[head + 4 * c : head + 4 * c + 4].tolist()
            if targets:
                self.log(f"val/loss/{name}", nll / targets, sync_dist=False)
            if head == 4 and n_bytes:
                self.log(f"val/bpb/{name}", bits_per_byte(nll_bytes, n_bytes), sync_dist=False)
        self.log("step", float(self.global_step), sync_dist=False)

    # -- optimizer ---------------------------------------------------------------------------

    def configure_optimizers(self):
        mixed = str(self.trainer.precision).endswith("-mixed")
        fused_ok = not (mixed and self.optim_cfg.grad_clip > 0)
        optimizer = build_optimizer(self.gpt, self.optim_cfg, self.device.type, fused_ok)
        schedule = build_schedule(optimizer, self.optim_cfg, self.trainer.max_steps, self.clock)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ):
        # The clipping norm belongs to the optimizer's config (optimizer.grad_clip).
        if self.optim_cfg.grad_clip > 0:
            self.clip_gradients(
                optimizer,
                gradient_clip_val=self.optim_cfg.grad_clip,
                gradient_clip_algorithm="norm",
            )

    # -- the rest ----------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["tokens_seen"] = self.tokens_seen
        if self.hparams.eos_token is not None:
            # What scripts/generate.py needs besides the run's tokenizer.json.
            checkpoint["tokenizer"] = {"eos_token": self.hparams.eos_token}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.tokens_seen = checkpoint.get("tokens_seen", 0)
        if self.model is None:  # a checkpoint knows its vocabulary
            self._build(checkpoint["hyper_parameters"]["model"])
