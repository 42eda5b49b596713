"""Evaluate a trained GPT: `python eval.py ckpt_path=<checkpoint or run folder> [data...]`.

Loss, perplexity and bits per byte of the checkpoint on the run's held-out split (default), on
text files (data.files=[...]) or on one epoch of a stream (data.url=ws://...); eval.json beside
the checkpoint, and a W&B run (job_type eval) in the training run's group. Configs:
conf/eval.yaml; the work: src/streamgpt/evaluation/.
Exit codes: 0 done, 2 a configuration or data error (one line says which), 1 anything else.
"""

import json
import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from streamgpt.evaluation.config import check_command_line, register_configs

CONF = Path(__file__).resolve().parent / "conf"
register_configs(CONF)


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> float:
    from streamgpt.data.client import StreamError
    from streamgpt.evaluation.config import validate
    from streamgpt.evaluation.task import evaluate

    log = logging.getLogger("streamgpt")
    try:
        validate(cfg)
        record = evaluate(cfg, Path(cfg.paths.output_dir))
    except MissingMandatoryValue as e:
        key = e.full_key
        log.error("error: %s has no value; set it on the command line, e.g. %s=...", key, key)
        sys.exit(2)
    except (ValueError, StreamError, FileNotFoundError) as e:
        log.error("error: %s", e)  # a config or data error a user can fix: one line
        sys.exit(2)
    print(json.dumps(record, indent=2), flush=True)
    return record["loss"]


if __name__ == "__main__":
    check_command_line(CONF, sys.argv[1:])  # a misspelt key: one line, before Hydra composes
    main()
