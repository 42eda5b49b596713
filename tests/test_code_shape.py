"""src/ stays readable top to bottom: no function over 60 lines, no module over 400."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "streamgpt"
MAX_FUNCTION, MAX_MODULE = 60, 400


def test_no_function_or_module_in_src_is_too_long_to_read():
    modules = sorted(SRC.rglob("*.py"))
    assert len(modules) > 30, modules
    long = []
    for path in modules:
        text = path.read_text()
        name = str(path.relative_to(SRC))
        if text.count("\n") > MAX_MODULE:
            long.append(f"{name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION:
                    long.append(f"{name}:{node.lineno} {node.name}() {length} lines")
    assert not long, long
