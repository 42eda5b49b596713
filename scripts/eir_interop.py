"""Train the real EIR (`eirtrain`, PyPI eir-dl) from our stream server, end to end.

    python scripts/eir_interop.py --eirtrain VENV/bin/eirtrain [--samples 2000] [KEY=VALUE ...]

(KEY=VALUE: more server overrides, e.g. workers=2.)

Starts our server (embedded Shakespeare, an end after --samples samples so that EIR's run
finishes), writes a scaled-down version of EIR's streaming tutorial 01 configs, runs eirtrain
against the server, and checks that it exits 0 having trained, validated and generated text.
EIR itself is not a dependency of streamgpt; install it in its own environment.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from streamgpt.server.process import ServerProcess

GLOBALS = """\
basic_experiment:
  batch_size: 16
  memory_dataset: true
  n_epochs: 1
  output_folder: {out}
  valid_size: 32
  dataloader_workers: 0
evaluation_checkpoint:
  checkpoint_interval: 50
  n_saved_models: 1
  sample_interval: 50
data_preparation:
  streaming_setup_samples: 256
visualization_logging:
  plot_skip_steps: 0
"""
FUSION = 'model_type: "pass-through"\n'
OUTPUT = """\
output_info:
  output_source: {url}
  output_name: text_output
  output_type: sequence
output_type_info:
  max_length: 64
  split_on: null
  tokenizer: "bpe"
  adaptive_tokenizer_max_vocab_size: 1024
  sampling_strategy_if_longer: "uniform"
  min_freq: 1
model_config:
  embedding_dim: 64
  model_init_config:
    num_layers: 1
sampling_config:
  n_eval_inputs: 1
  manual_inputs:
    - text_output: "This movie is the most"
    - text_output: "Steven"
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--eirtrain", required=True, help="path to the eirtrain executable")
    parser.add_argument("--samples", type=int, default=2000, help="server end (max_samples)")
    parser.add_argument("server", nargs="*", help="more server overrides, e.g. workers=2")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="eir-interop-"))
    out = work / "run"
    overrides = [f"end.max_samples={args.samples}", f"hydra.run.dir={work / 'server'}"]
    overrides += args.server
    with ServerProcess(overrides) as server:
        (work / "globals.yaml").write_text(GLOBALS.format(out=out))
        (work / "fusion.yaml").write_text(FUSION)
        (work / "output.yaml").write_text(OUTPUT.format(url=server.url))
        cmd = [
            args.eirtrain,
            "--global_configs",
            "globals.yaml",
            "--fusion_configs",
            "fusion.yaml",
            "--output_configs",
            "output.yaml",
        ]
        started = time.monotonic()
        with (work / "eirtrain.log").open("w") as log:
            code = subprocess.run(cmd, cwd=work, stdout=log, stderr=subprocess.STDOUT).returncode
        elapsed = time.monotonic() - started
    generated = sorted(out.glob("results/**/samples/*/manual/*_generated.txt"))
    checkpoints = sorted((out / "saved_models").glob("*.pt"))
    print(f"eirtrain exited {code} after {elapsed:.0f} s; log: {work / 'eirtrain.log'}")
    print(f"server log: {work / 'server' / 'serve.log'}")
    print(f"{len(generated)} generated texts, {len(checkpoints)} checkpoints under {out}")
    for path in generated[-2:]:
        print(f"  {path.relative_to(out)}: {path.read_text()[:120]!r}")
    ok = code == 0 and generated and checkpoints
    print("EIR interop: OK" if ok else "EIR interop: FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
