"""A weighted mixture of the other sources (`source=mix`): each component is a source config of
its own, loaded as that source loads it, its sample ids prefixed with the component's name.
How the components are interleaved: server/mixture.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from streamgpt.server.corpus import Chunking, SampleEncoder
from streamgpt.server.mixture import MixCorpus


def load(
    cfg: Any, chunking: Chunking, encoder: SampleEncoder, loaders: dict[str, Callable]
) -> MixCorpus:
    # config.py imports this package (for SOURCES), so this import waits until it is used.
    from streamgpt.server.config import mix_config

    parts, more_stages = mix_config(cfg)
    components = {
        name: loaders[part.source.name](
            part.source, chunking, SampleEncoder(encoder.output_name, id_prefix=f"{name}/")
        )
        for name, part in parts.items()
    }
    # Stages start all from a sample or all from a step (mix_config checked).
    by = "step" if any(stage.from_step is not None for stage in more_stages) else "sample"
    stages = [(0, {name: part.weight for name, part in parts.items()})]
    stages += [(stage[f"from_{by}"], dict(stage.weights)) for stage in more_stages]
    return MixCorpus(components, stages, chunking, by)
