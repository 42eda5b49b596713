"""Training entry point: `python train.py model=babygpt precision=bf16-mixed` (Hydra).

The trainer (stream client, BabyGPT, Lightning module, Hydra app) is being built; until it lands
this says so instead of pretending. The stream server is ready: `make serve`.
"""

import sys

if __name__ == "__main__":
    sys.exit(
        "streamgpt: training is not implemented yet (the stream client, model and Hydra app are "
        "in progress); the stream server is ready: make serve"
    )
