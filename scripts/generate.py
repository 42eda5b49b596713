"""Sample from a trained checkpoint, streaming tokens to the terminal as they come.

    python scripts/generate.py outputs/train/runs/<date>_<time>            # the run's last.ckpt
    python scripts/generate.py path/to/step=0001000-val_loss=4.1234.ckpt --prompt "Steven"
    python scripts/generate.py RUN --prompts-file prompts.txt --max-new-tokens 200 --temperature 0.8

Uses the run's own tokenizer.json (next to its checkpoints/ folder, or --tokenizer).
With no prompt, it samples from scratch (a new document).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer

from streamgpt.checkpoints import load_gpt, run_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path, help="a run folder, its checkpoints/ folder, or a .ckpt")
    parser.add_argument("--prompt", action="append", default=[], help="repeatable")
    parser.add_argument("--prompts-file", type=Path, help="one prompt per line")
    parser.add_argument("--which", choices=["last", "best"], default="last")
    parser.add_argument("--tokenizer", type=Path, help="default: the run's tokenizer.json")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    try:
        checkpoint = run_checkpoint(args.path, args.which)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    tokenizer_path = args.tokenizer or checkpoint.parent.parent / "tokenizer.json"
    if not tokenizer_path.exists():
        sys.exit(
            f"error: no tokenizer at {tokenizer_path}; pass --tokenizer path/to/tokenizer.json"
        )
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    model, state = load_gpt(checkpoint, args.device)
    eos_token = state.get("tokenizer", {}).get("eos_token", "<|endoftext|>")
    eos = tokenizer.token_to_id(eos_token)
    prompts = list(args.prompt)
    if args.prompts_file:
        prompts += [line for line in args.prompts_file.read_text().splitlines() if line.strip()]
    print(f"# {checkpoint}", file=sys.stderr)
    for n, prompt in enumerate(prompts or [""]):
        ids = tokenizer.encode(prompt, add_special_tokens=False).ids if prompt else []
        generator = torch.Generator(args.device).manual_seed(args.seed + n)
        shown = tokenizer.decode(ids)
        sys.stdout.write(("\n\n" if n else "") + shown)
        new: list[int] = []
        for token in model.generate_stream(
            ids,
            args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            eos_id=eos,
            generator=generator,
        ):
            new.append(token)
            text = tokenizer.decode(ids + new)  # whole text: multi-byte characters come out whole
            if not text.endswith("\ufffd"):
                sys.stdout.write(text[len(shown) :])
                sys.stdout.flush()
                shown = text
        sys.stdout.write("\n")


if __name__ == "__main__":
    main()
