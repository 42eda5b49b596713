"""Train a GPT on a live text stream: `python train.py [model=babygpt] [precision=bf16-mixed] ...`.

Configs: conf/train.yaml and its groups; `python train.py --help` lists them, `--cfg job` prints
the composed config. The work is in src/streamgpt/app.py.
"""

import logging
import sys

import hydra
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from streamgpt.config import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from streamgpt.config import validate
    from streamgpt.data.client import StreamError

    try:
        validate(cfg)  # before importing Lightning: a bad value costs seconds, not a long import
        from streamgpt.app import train

        return train(cfg)
    except MissingMandatoryValue as e:
        logging.getLogger("streamgpt").error(
            "error: %s has no value; set it on the command line, e.g. %s=...",
            e.full_key,
            e.full_key,
        )
        sys.exit(2)
    except (ValueError, StreamError, FileNotFoundError) as e:
        # A config or setup error a user can fix: one line, no traceback.
        logging.getLogger("streamgpt").error("error: %s", e)
        sys.exit(2)


if __name__ == "__main__":
    main()
