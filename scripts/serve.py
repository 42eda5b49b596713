"""Run the stream server: `python scripts/serve.py [source=shakespeare|files|fineweb] [port=8765]`.

Every option is in conf/serve.yaml and conf/source/; `--help` lists them, `--cfg job` prints the
composed config.
"""

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from streamgpt.command_line import check_command_line, register_help
from streamgpt.server import run
from streamgpt.server.config import SOURCE_SCHEMAS, ServeConfig, register_configs

CONF = Path(__file__).resolve().parents[1] / "conf"
USAGE = "python scripts/serve.py [source=option] [key=value ...]: serve a corpus to trainers"
register_configs()
register_help(CONF, "serve", USAGE, "port=8765 chunk.words=256")


@hydra.main(version_base="1.3", config_path="../conf", config_name="serve")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except MissingMandatoryValue as e:
        key = e.full_key
        logging.getLogger("streamgpt.server").error(
            "error: %s has no value; set it on the command line, e.g. %s=...", key, key
        )
        sys.exit(2)
    except (ValueError, RuntimeError, OSError) as e:
        # Errors a user can cause (a bad value, a busy port, no network): one line, no traceback.
        logging.getLogger("streamgpt.server").error("error: %s", e)
        sys.exit(2)


if __name__ == "__main__":
    check_command_line(CONF, "serve", ServeConfig, SOURCE_SCHEMAS, sys.argv[1:])
    main()
