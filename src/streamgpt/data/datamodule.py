"""StreamDataModule: a live stream in, training batches out, exactly resumable.

- prepare_data (global rank 0 only): checks the server(s), builds the run's tokenizer.json (trained
  on the first streamed samples, or a given file) and saves the validation samples to the run
  folder, so every rank and every resume uses the same ones (StreamSetup; train.py hands over
  the one it already ran, and nothing is done twice).
- setup (every rank): loads both. A mixture's validation windows are packed per component
  (packing.component_windows) and carry the component's index: val/loss/<component>.
- train_dataloader: one StreamDataset consumer per (rank, worker), disjoint and deterministic.
- state_dict / load_state_dict: every consumer's cursor and untrained tokens, gathered from all
  ranks into the checkpoint; a resume continues with the batch the run would have trained next.
  With elastic data (data.stream.elastic, elastic.py) they are every canonical stream's, and the
  resumed run may have other ranks, workers and accumulation.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
import orjson
import torch
import torch.distributed as dist
from tokenizers import Tokenizer
from torch.utils.data import DataLoader, TensorDataset

from streamgpt.data import elastic
from streamgpt.data.client import StreamError
from streamgpt.data.consumer import close_feeds
from streamgpt.data.dataset import FirstBatches, StreamDataset
from streamgpt.data.elastic import Layout
from streamgpt.data.packing import Encoder, TokenPacker, component_windows
from streamgpt.data.stream_setup import StreamSetup

log = logging.getLogger("streamgpt.data")

STATE_VERSION = 1  # one stream per consumer; resumed by the same ranks x workers
ELASTIC_STATE_VERSION = 2  # canonical streams; resumed by any topology that divides them


class StreamDataModule(L.LightningDataModule):
    def __init__(
        self,
        stream: Any,
        tokenizer: Any,
        run_dir: str | Path,
        *,
        setup: StreamSetup | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        self.cfg = stream
        self.tok_cfg = tokenizer
        self.run_dir = Path(run_dir)
        self.prepare_data_per_node = False  # one tokenizer per run, in the (shared) run folder
        self._rank, self._world = rank, world_size
        # The run's setup (train.py hands over the one headstart.HeadStart did), or our own.
        self.streams = setup or StreamSetup(stream, tokenizer, run_dir)
        self.urls, self.token = self.streams.urls, self.streams.token
        self.tokenizer: Tokenizer | None = None
        self.val_x: torch.Tensor | None = None
        self.val_y: torch.Tensor | None = None
        self.val_component: torch.Tensor | None = None  # a mixture's: window -> val_components
        self.val_components: list[str] = []  # a mixture's components with validation windows
        self.component_tokens: list[int] = []  # per self.components: tokens this rank trained
        self._states: dict[
            int, dict[str, Any]
        ] = {}  # consumer -> state after its last trained batch
        self._units: dict[int, dict[str, Any]] = {}  # canonical stream -> state (elastic data)
        self._trained = 0  # batches this rank has trained
        self._resume: dict[str, Any] | None = None
        self.last_ids: list[str] = []  # sample ids that started in the last trained batch
        self.saw_last_batch = False  # a consumer of this rank trained its stream's last batch

    # -- identity ----------------------------------------------------------------------------

    @property
    def rank(self) -> int:
        if self._rank is not None:
            return self._rank
        trainer = getattr(self, "trainer", None)
        return trainer.global_rank if trainer is not None else 0

    @property
    def world_size(self) -> int:
        if self._world is not None:
            return self._world
        trainer = getattr(self, "trainer", None)
        return trainer.world_size if trainer is not None else 1

    @property
    def num_consumers_per_rank(self) -> int:
        return max(1, self.cfg.num_workers)

    @property
    def accumulate(self) -> int:
        trainer = getattr(self, "trainer", None)
        return trainer.accumulate_grad_batches if trainer is not None else 1

    def layout(self) -> Layout | None:
        """The canonical streams and this run's consumers of them, with elastic data."""
        elastic = self.cfg.elastic
        if not elastic.streams:
            return None
        layout = Layout(
            streams=elastic.streams,
            phases=elastic.phases,
            global_batch=self.cfg.batch_size * self.world_size * self.accumulate,
            ranks=self.world_size,
            accumulate=self.accumulate,
            workers=self.num_consumers_per_rank,
        )
        problem = layout.problem()
        if problem:
            raise StreamError(problem)
        return layout

    @property
    def finite(self) -> bool:
        """Whether the training stream can end (then ranks must agree when to stop)."""
        return bool(self.server.get("finite"))

    @property
    def components(self) -> list[str]:
        """The names of the mixture the server serves; [] for a single source."""
        return self.server.get("components", [])

    @property
    def server(self) -> dict[str, Any]:
        return self.streams.server

    @property
    def tokenizer_path(self) -> Path:
        return self.streams.tokenizer_path

    @property
    def validation_path(self) -> Path:
        return self.streams.validation_path

    @property
    def vocab_size(self) -> int:
        assert self.tokenizer is not None, "call setup() first"
        return self.tokenizer.get_vocab_size()

    @property
    def eos_id(self) -> int:
        assert self.tokenizer is not None, "call setup() first"
        return self.tokenizer.token_to_id(self.tok_cfg.eos_token)

    # -- Lightning hooks ---------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Rank 0: the run's tokenizer and validation samples, unless the run folder has them."""
        self.streams.prepare()

    def setup(self, stage: str | None = None) -> None:
        if not self.streams.prepared and getattr(self, "trainer", None) is None:
            self.prepare_data()  # used on its own, without a Trainer to call prepare_data
        self.streams.servers()
        self.tokenizer = self.streams.tokenizer()
        self.val_x = self.val_y = self.val_component = None
        self.component_tokens = [0] * len(self.components)
        if self.cfg.valid_size > 0:
            lines = self.validation_path.read_bytes().splitlines()
            samples = [orjson.loads(line) for line in lines]
            ids, texts = [s["id"] for s in samples], [s["text"] for s in samples]
            if self.components:
                self._component_windows(ids, texts)
            else:
                self.val_x, self.val_y = self._windows(ids, texts)

    def _encoder(self) -> Encoder:
        assert self.tokenizer is not None
        return Encoder(self.tokenizer, self.server.get("eot_marker", ""), self.tok_cfg.eos_token)

    def _windows(self, ids: list[str], texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Validation: the samples packed like training data, in full windows of one sequence."""
        packer = TokenPacker(1, self.cfg.max_length)
        packer.add(ids, self._encoder()(texts))
        xs, ys = [], []
        while packer.ready():
            x, y, _ = packer.pop()
            xs.append(torch.from_numpy(x))
            ys.append(torch.from_numpy(y))
        if not xs:
            raise StreamError(
                f"the {len(texts)} validation samples hold fewer than max_length+1 = "
                f"{self.cfg.max_length + 1} tokens; raise data.stream.valid_size"
            )
        return torch.cat(xs), torch.cat(ys)

    def _component_windows(self, ids: list[str], texts: list[str]) -> None:
        """Validation of a mixture: windows that never span two components, each with its
        component's index (-1: the components' tails, packed together, in val/loss only)."""
        x, y, c = component_windows(
            ids, self._encoder()(texts), self.components, self.cfg.max_length
        )
        if not len(x):
            raise StreamError(
                f"the {len(texts)} validation samples hold fewer than max_length+1 = "
                f"{self.cfg.max_length + 1} tokens; raise data.stream.valid_size"
            )
        measured = sorted(set(c.tolist()) - {-1})
        too_small = [n for i, n in enumerate(self.components) if i not in measured]
        if too_small and self.rank == 0:
            log.warning(
                "the validation samples of mixture component(s) %s hold fewer than max_length+1 = "
                "%d tokens: no val/loss/<component> for them (their tokens count in val/loss); "
                "raise data.stream.valid_size or the component's validation split on the server",
                ", ".join(too_small),
                self.cfg.max_length + 1,
            )
        # Indices into the components that have windows, as the module logs them.
        renumber = {old: new for new, old in enumerate(measured)}
        self.val_components = [self.components[i] for i in measured]
        self.val_x, self.val_y = torch.from_numpy(x), torch.from_numpy(y)
        self.val_component = torch.tensor([renumber.get(i, -1) for i in c.tolist()])

    def train_dataloader(self) -> DataLoader:
        assert self.tokenizer is not None, "call setup() first"
        workers = self.cfg.num_workers
        if workers > 0:
            # Tokenization parallelism in a forked worker can deadlock; each worker is a consumer.
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        states, phase, first = {}, 0, 0
        layout = self.layout()
        # Each rank keeps the restored states of its own streams only: the next checkpoint
        # gathers every rank's, and a copy of another rank's would overwrite that rank's newer one.
        if self._resume is not None and layout is not None:
            states = {int(k): v for k, v in self._resume["units"].items()}
            first = self._trained
            self._units = {u: v for u, v in states.items() if layout.rank_of(u) == self.rank}
        elif self._resume is not None:
            states = {int(k): v for k, v in self._resume["consumers"].items()}
            phase = self._resume["batches"].get(str(self.rank), 0) % self.num_consumers_per_rank
            mine = range(
                self.rank * self.num_consumers_per_rank,
                (self.rank + 1) * self.num_consumers_per_rank,
            )
            self._states = {k: v for k, v in states.items() if k in mine}
        starts = self.server.get("step_stages")  # a mixture's stages from a training step
        dataset = StreamDataset(
            urls=self.urls,
            cfg=self.cfg,
            tokenizer_json=self.tokenizer.to_str(),
            server_eot=self.server.get("eot_marker", ""),
            eos_token=self.tok_cfg.eos_token,
            token=self.token,
            rank=self.rank,
            world_size=self.world_size,
            states=states,
            phase=phase,
            layout=layout,
            first=first,
            step_stages=tuple(starts) if starts else None,
            accumulate=self.accumulate,
        )
        if self.cfg.overfit_batches:
            return DataLoader(FirstBatches(dataset, self.cfg.overfit_batches), batch_size=None)
        return DataLoader(
            dataset,
            batch_size=None,  # the dataset yields whole batches
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def teardown(self, stage: str) -> None:
        close_feeds()  # no consumer thread outlives training (see data/dataset.py)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_x is None:
            return []
        tensors = [self.val_x, self.val_y]
        if self.val_component is not None:  # (x, y, component index) batches
            tensors.append(self.val_component)
        return DataLoader(TensorDataset(*tensors), batch_size=self.cfg.batch_size)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Record the consumer state of each training batch as it goes to the model."""
        if isinstance(batch, dict) and "x" in batch:
            if "units" in batch:
                self._units.update(batch["units"])
            else:
                self._states[batch["consumer"]] = batch["state"]
            self._trained += 1
            self.last_ids = batch["ids"]
            if self.components:
                self._count_components(batch.get("components", {}))
            self.saw_last_batch = self.saw_last_batch or batch.get("last", False)
            if self.cfg.log_batches:
                self._log_batch(batch)
            return batch["x"], batch["y"]
        return batch

    def _count_components(self, counts: dict[str, int]) -> None:
        for c, name in enumerate(self.components):
            self.component_tokens[c] += counts.get(name, 0)

    def _log_batch(self, batch: dict[str, Any]) -> None:
        def digest(x: torch.Tensor) -> str:
            return hashlib.blake2b(x.numpy().tobytes(), digest_size=8).hexdigest()

        line = {
            "batch": self._trained,
            "step": (self._trained - 1) // self.accumulate,
            "consumer": batch["consumer"],
            "ids": batch["ids"],
            "x": digest(batch["x"]),
            "rows": [digest(row) for row in batch["x"]],  # the same sequences, any batch shapes
        }
        if "unit_ids" in batch:  # elastic data: the samples of each canonical stream
            line["units"] = {str(u): ids for u, ids in batch["unit_ids"].items()}
        with (self.run_dir / f"batches-rank{self.rank}.jsonl").open("ab") as f:
            f.write(orjson.dumps(line) + b"\n")

    # -- exact resume ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        elastic = self.cfg.elastic.streams > 0
        mine = {"consumers": self._units if elastic else self._states, "batches": self._trained}
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, (self.rank, mine))
        else:
            gathered = [(self.rank, mine)]
        consumers: dict[str, Any] = {}
        batches: dict[str, int] = {}
        for rank, part in gathered:
            consumers.update({str(k): v for k, v in part["consumers"].items()})
            batches[str(rank)] = part["batches"]
        topology = {
            "world_size": self.world_size,
            "num_workers": self.num_consumers_per_rank,
            "seed": self.cfg.seed,
            "urls": len(self.urls),
            "batches": batches,
        }
        if elastic:
            return {
                "version": ELASTIC_STATE_VERSION,
                **topology,
                "accumulate": self.accumulate,
                "elastic": self._canonical(),
                "units": consumers,
            }
        return {"version": STATE_VERSION, **topology, "consumers": consumers}

    def _canonical(self) -> dict[str, int]:
        """What fixes the sequences of every step (with the corpus and the seed)."""
        layout = self.layout()
        assert layout is not None
        return {
            "streams": layout.streams,
            "phases": layout.phases,
            "global_batch": layout.global_batch,
            "max_length": self.cfg.max_length,
            "seed": self.cfg.seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        version, canonical = state.get("version"), self.cfg.elastic.streams > 0
        if version == ELASTIC_STATE_VERSION and canonical:
            # Canonical streams resume on any topology that divides them (elastic.py).
            self._trained = elastic.first_micro_batch(state, self._canonical(), self.accumulate)
            self._resume = state
            return
        if version == ELASTIC_STATE_VERSION or (version == STATE_VERSION and canonical):
            then = "elastic" if version == ELASTIC_STATE_VERSION else "per-consumer"
            raise ValueError(
                f"the checkpoint's data was read as {then} streams and this run asks for "
                f"data.stream.elastic.streams={self.cfg.elastic.streams}: resume with the "
                "checkpoint's data.stream.elastic settings"
            )
        if version != STATE_VERSION:
            raise ValueError(f"data state version {version} is not {STATE_VERSION}")
        now = (self.world_size, self.num_consumers_per_rank, self.cfg.seed)
        then = (state["world_size"], state["num_workers"], state["seed"])
        if now != then:
            raise ValueError(
                f"the checkpoint's stream was read by {then[0]} ranks x {then[1]} workers with "
                f"seed {then[2]}; this run has {now[0]} x {now[1]} with seed {now[2]}. Consumer "
                "identities would change, so the data would not continue exactly: resume with the "
                "same trainer.devices x num_nodes, data.stream.num_workers and data.stream.seed, "
                "or train with data.stream.elastic to resume on others"
            )
        self._resume = state
        self._trained = state["batches"].get(str(self.rank), 0)
