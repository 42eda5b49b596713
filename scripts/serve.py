"""Run the stream server: `python scripts/serve.py [source=shakespeare|files|fineweb] [port=8765]`.

Every option is in conf/serve.yaml and conf/source/; `--help` lists them, `--cfg job` prints the
composed config.
"""

import hydra
from omegaconf import DictConfig

from streamgpt.server import run
from streamgpt.server.config import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="serve")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
