"""Optuna searches that continue: a rerun of `hparams_search=optuna` adds new trials to the study.

The study lives in `<project>/outputs/optuna.db` (conf/hparams_search/optuna.yaml), whatever the
working directory. Its sampler is seeded with `seed` plus the number of trials the study already
holds: a first search is reproducible, and a rerun does not replay the first search's proposals
(the same seed would propose exactly the parameters of its first trials again).
"""

from __future__ import annotations

from pathlib import Path


def sweep_seed(seed: int, storage: str | None, study_name: str | None) -> int:
    """The sampler's seed for this invocation (an OmegaConf resolver: conf/hparams_search)."""
    if not storage or not study_name:
        return int(seed)
    if storage.startswith("sqlite:///"):
        Path(storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    import optuna

    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:  # no such study yet: this is the first search
        return int(seed)
    return int(seed) + len(study.trials)
