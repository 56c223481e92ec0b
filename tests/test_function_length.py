"""No function in the package is over 80 lines, so each reads on one screen (issue 20). The
sampler's decode loop is the one exception: it is rewritten whole by the kernels issue."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / "emor3_jax"
LIMIT = 80
EXEMPT = {("sampling/sampler.py", "_decode")}


def long_functions(root: pathlib.Path = ROOT, limit: int = LIMIT) -> list[str]:
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and (rel, node.name) not in EXEMPT:
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    out.append(f"emor3_jax/{rel}:{node.lineno} {node.name}: {n} lines")
    return out


def test_no_function_over_80_lines():
    assert long_functions() == []


def test_the_check_counts_lines(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(LIMIT))  # def line + 80 = 81 lines
    (tmp_path / "m.py").write_text(f"def f():\n{body}\n\n\ndef g():\n    return 1\n")
    assert long_functions(tmp_path) == [f"emor3_jax/m.py:1 f: {LIMIT + 1} lines"]
