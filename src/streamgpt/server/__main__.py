"""Run the stream server: `python -m streamgpt.server [source=...] [port=8765] [key=value ...]`.

Every option is in the packaged config (streamgpt/server/conf/serve.yaml and source/); `--help`
lists them, `--cfg job` prints the composed config. The config ships with the package, so an
installed streamgpt serves from any directory.
"""

import logging
import sys

import hydra
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from streamgpt.command_line import check_command_line, register_help
from streamgpt.server import run
from streamgpt.server.config import CONF, SOURCE_SCHEMAS, ServeConfig, register_configs

USAGE = "python -m streamgpt.server [source=option] [key=value ...]: serve a corpus to trainers"


@hydra.main(version_base="1.3", config_path="conf", config_name="serve")
def _serve(cfg: DictConfig) -> None:
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


def main() -> None:
    register_configs()
    register_help([CONF], "serve", USAGE, "port=8765 chunk.words=256")
    check_command_line([CONF], "serve", ServeConfig, SOURCE_SCHEMAS, sys.argv[1:])
    _serve()


if __name__ == "__main__":
    main()
