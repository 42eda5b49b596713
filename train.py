"""Train a GPT on a live text stream: `python train.py [model=babygpt] [precision=bf16-mixed] ...`.

Configs: conf/train.yaml and its groups; `python train.py --help` lists them, `--cfg job` prints
the composed config. The run's setup is in src/streamgpt/headstart.py, the training in
src/streamgpt/run.py.
Exit codes: 0 finished, 2 a configuration or setup error (one line says which), 130 / 143 stopped
by SIGINT / SIGTERM after saving a checkpoint (resume=auto continues it), 1 anything else.
"""

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from streamgpt import config_tree
from streamgpt.config import check_command_line, register_configs
from streamgpt.headstart import HeadStart, global_rank, local_rank
from streamgpt.malloc import allocator
from streamgpt.perf import STARTUP
from streamgpt.signals import SIGNALS, Stopped

CONF = Path(__file__).resolve().parent / "conf"
register_configs(CONF)
STARTUP.mark("python, torch and hydra imports")


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from streamgpt.config import validate
    from streamgpt.data.client import StreamError

    log = logging.getLogger("streamgpt")
    if any(phase == "config composed and checked" for phase, _ in STARTUP.marks):
        STARTUP.restart()  # the next job of a multirun
    SIGNALS.install()  # SIGINT / SIGTERM: stop now before training, after a checkpoint during it
    try:
        validate(cfg)  # before importing Lightning: a bad value costs seconds, not a long import
        allocator(cfg.trainer.malloc)  # steps reuse freed buffers (speed) or return large ones
        if cfg.print_config and global_rank() == 0 and local_rank() == 0:
            config_tree.show(cfg, Path(cfg.paths.output_dir))
        STARTUP.mark("config composed and checked")
        with HeadStart(cfg) as head:  # the stream server and tokenizer, while Lightning imports
            from streamgpt.run import train

            STARTUP.mark("lightning imports")
            return train(cfg, head)
    except Stopped as e:
        log.warning("%s%s", e, "; continue with resume=auto" if e.checkpoint else "")
        sys.exit(e.exit_code)
    except MissingMandatoryValue as e:
        key = e.full_key
        log.error("error: %s has no value; set it on the command line, e.g. %s=...", key, key)
        sys.exit(2)
    except (ValueError, StreamError, FileNotFoundError) as e:
        # A config or setup error a user can fix: one line, no traceback.
        log.error("error: %s", e)
        sys.exit(2)
    finally:
        SIGNALS.uninstall()


if __name__ == "__main__":
    check_command_line(CONF, sys.argv[1:])  # a misspelt key: one line, before Hydra composes
    main()
