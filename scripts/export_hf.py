"""Export a trained model as a Hugging Face folder (transformers loads it offline):

    python scripts/export_hf.py outputs/train/runs/<date>_<time>          # writes <run>/hf
    python scripts/export_hf.py path/to/last.ckpt --out my-model

learned positions + LayerNorm + GELU -> GPT2LMHeadModel; rotary + RMSNorm + SwiGLU ->
LlamaForCausalLM (src/streamgpt/hf.py says why each reproduces ours exactly). The folder holds
config.json, model.safetensors, generation_config.json and the run's tokenizer (tokenizer.json,
tokenizer_config.json), for AutoModelForCausalLM / AutoTokenizer.from_pretrained(folder).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from streamgpt.checkpoints import run_checkpoint
from streamgpt.hf import export


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "path",
        type=Path,
        help="a run folder (or its checkpoints/), or a .ckpt. In a folder: last.ckpt (what the\n"
        "run ended with), or with --which best the lowest val/loss in a checkpoint's name",
    )
    parser.add_argument("--which", choices=["last", "best"], default="last")
    parser.add_argument("--out", type=Path, help="default: <run folder>/hf")
    parser.add_argument("--tokenizer", type=Path, help="default: the run's tokenizer.json")
    args = parser.parse_args()
    try:
        checkpoint = run_checkpoint(args.path, args.which)
        out = args.out or checkpoint.resolve().parent.parent / "hf"
        name = export(checkpoint, out, args.tokenizer)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"{checkpoint} -> {out} ({name})")


if __name__ == "__main__":
    main()
