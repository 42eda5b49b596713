"""The resolved run config as a tree: printed when a run starts, kept as <run>/config_tree.log.

Hydra keeps the composed config in <run>/.hydra/config.yaml with its interpolations unresolved;
this is what the run really uses (paths, max_length, the logger's tags), group by group, in the
order a reader wants them.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import rich.syntax
import rich.tree
from omegaconf import OmegaConf
from rich.console import Console

from streamgpt.atomic import write_atomic

ORDER = ("model", "optimizer", "data", "tokenizer", "trainer", "logger", "callbacks", "server")


def render(cfg: Any, width: int = 100) -> str:
    """The tree as text: one branch per group (ORDER first), then the top-level values."""
    tree = rich.tree.Tree("CONFIG", guide_style="dim")
    groups = [k for k in ORDER if k in cfg] + [
        k for k in cfg if k not in ORDER and OmegaConf.is_dict(cfg[k])
    ]
    for key in groups:
        text = OmegaConf.to_yaml(cfg[key], resolve=True).rstrip() or "{}"
        tree.add(key).add(rich.syntax.Syntax(text, "yaml", theme="ansi_dark"))
    scalars = {k: cfg[k] for k in cfg if k not in groups}
    if scalars:
        text = OmegaConf.to_yaml(OmegaConf.create(scalars), resolve=True).rstrip()
        tree.add("run").add(rich.syntax.Syntax(text, "yaml", theme="ansi_dark"))
    buffer = io.StringIO()
    Console(file=buffer, width=width, no_color=True, force_terminal=False).print(tree)
    return buffer.getvalue()


def show(cfg: Any, run_dir: Path) -> None:
    """Print the tree and write it to <run>/config_tree.log (global rank 0 only: the caller)."""
    text = render(cfg)
    print(text, end="", flush=True)
    write_atomic(run_dir / "config_tree.log", text)
