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
from streamgpt.headstart import HeadStart
from streamgpt.malloc import keep_freed_memory
from streamgpt.perf import STARTUP

register_configs()
STARTUP.mark("python, torch and hydra imports")


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from streamgpt.config import validate
    from streamgpt.data.client import StreamError

    keep_freed_memory()  # steps reuse their buffers instead of faulting in fresh pages each time
    if any(phase == "config composed and checked" for phase, _ in STARTUP.marks):
        STARTUP.restart()  # the next job of a multirun
    try:
        validate(cfg)  # before importing Lightning: a bad value costs seconds, not a long import
        STARTUP.mark("config composed and checked")
        with HeadStart(cfg) as head:  # the stream server and tokenizer, while Lightning imports
            from streamgpt.app import train

            STARTUP.mark("lightning imports")
            return train(cfg, head)
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
