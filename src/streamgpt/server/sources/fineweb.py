"""FineWeb (or any Hugging Face text dataset) through the `datasets` library's streaming mode.

Too large to index, so it is a ShardedCorpus: the dataset's data files (or, with
`shard_by=row_group`, their parquet row groups) are the units dealt to consumers, permuted per
epoch, with documents shuffled in windows inside each unit. Local files in FineWeb's format work
the same way: `source.path=parquet source.data_files=[...]`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from streamgpt.server.corpus import Chunking, SampleEncoder, ShardedCorpus

log = logging.getLogger("streamgpt.server")


def _open(cfg: Any):
    import datasets

    kwargs: dict[str, Any] = {"split": cfg.split, "streaming": True}
    if cfg.config_name:
        kwargs["name"] = cfg.config_name
    if cfg.revision:
        kwargs["revision"] = cfg.revision
    if cfg.data_files:
        kwargs["data_files"] = list(cfg.data_files)
    where = f"{cfg.path}" + (f" ({cfg.config_name})" if cfg.config_name else "")
    try:
        ds = datasets.load_dataset(cfg.path, **kwargs)
    except Exception as e:
        raise RuntimeError(
            f"could not open {where} with datasets.load_dataset: {type(e).__name__}: {e}\n"
            "The fineweb source streams from the Hugging Face hub and needs internet access. "
            "Offline, point it at local files: source.path=parquet "
            "source.config_name=null source.data_files=[/data/fineweb/*.parquet]"
        ) from e
    missing = [c for c in (cfg.text_field, cfg.id_field) if c and c not in (ds.column_names or [c])]
    if missing:
        raise ValueError(
            f"{where} has no column(s) {missing}; its columns are {ds.column_names} "
            "(set source.text_field / source.id_field)"
        )
    ds = ds.select_columns([c for c in (cfg.text_field, cfg.id_field) if c])
    if cfg.shard_by == "row_group":
        ds = ds.reshard()
    return ds, where


def load(cfg: Any, chunking: Chunking, encoder: SampleEncoder) -> ShardedCorpus:
    ds, where = _open(cfg)
    n_units = ds.num_shards
    units = [f"{cfg.path}:{cfg.config_name}:{cfg.shard_by}:{i}/{n_units}" for i in range(n_units)]

    def read_unit(unit: int, first_row: int) -> Iterator[tuple[int, str, str]]:
        part = ds.shard(num_shards=n_units, index=unit, contiguous=True)
        if first_row:
            part = part.skip(first_row)
        for row, example in enumerate(part, start=first_row):
            text = example[cfg.text_field] or ""
            key = str(example[cfg.id_field]) if cfg.id_field else f"{units[unit]}:{row}"
            yield row, key, text

    log.info("fineweb: %s streams as %d units (%s)", where, n_units, cfg.shard_by)
    return ShardedCorpus(
        "fineweb",
        units,
        read_unit,
        chunking=chunking,
        encoder=encoder,
        validation_fraction=cfg.validation_fraction or 0.0,
        min_words=cfg.min_words,
        window=cfg.shuffle_window,
        description={
            "source": "fineweb",
            "dataset": where,
            "data_files": list(cfg.data_files) if cfg.data_files else None,
            "shard_by": cfg.shard_by,
        },
    )
