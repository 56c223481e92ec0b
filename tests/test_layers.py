"""The package's layers point one way: a module imports only its own layer and those below it.

The order, bottom to top (written here and in docs/design.md):

    core        mesh and sharding rules, paths, several hosts, checkpoint I/O, metrics, batch types
    models      the Flax Qwen2.5-VL and its Hugging Face conversion
    data        sources, records, the tokenizer and the encoder
    sampling    the on-device sampler and rollouts
    emo_r3      the task: prompts, reflections, the reward
    rl          advantages, the GRPO loss, the learner, the steps (GRPO's, the cold start's)
    evaluation  held-out evaluation and its reports
    (top)       the modules directly under emor3_jax/: config, the run-time factory, loading,
                the run's set-up, the trainer and the entry points (train, eval, export, dry_run)

Every import is read from the source (function-level ones too), so a lazy import that crosses
a layer upward fails here as well.
"""

from __future__ import annotations

import ast
import pathlib

ORDER = ["core", "models", "data", "sampling", "emo_r3", "rl", "evaluation", "top"]
ROOT = pathlib.Path(__file__).resolve().parents[1] / "emor3_jax"


def _layer(module: str) -> str:
    """'emor3_jax.rl.learner' -> 'rl'; a module directly under emor3_jax/ -> 'top'."""
    parts = module.split(".")
    if len(parts) == 1:
        return "top"
    if (ROOT / parts[1]).is_dir():
        if parts[1] not in ORDER:
            raise AssertionError(f"package emor3_jax.{parts[1]} has no place in ORDER; add it in its layer")
        return parts[1]
    return "top"


def _imports(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, module) of every emor3_jax import in `path`."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("emor3_jax"):
            if node.module == "emor3_jax":  # from emor3_jax import trainer, core
                out += [(node.lineno, f"emor3_jax.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("emor3_jax")]
    return out


def violations(root: pathlib.Path = ROOT) -> list[str]:
    bad = []
    for path in sorted(root.rglob("*.py")):
        module = ".".join(("emor3_jax", *path.relative_to(root).with_suffix("").parts))
        here = _layer(module)
        for line, target in _imports(path):
            there = _layer(target)
            if ORDER.index(there) > ORDER.index(here):
                bad.append(f"{path.relative_to(root.parent)}:{line}: {here} imports {target} ({there} is above it)")
    return bad


def test_no_layer_imports_a_higher_one():
    assert violations() == []


def test_the_check_catches_an_upward_import(tmp_path):
    """The same check on a copy of the package with one import made to point up fails, naming it."""
    pkg = tmp_path / "emor3_jax"
    for path in ROOT.rglob("*.py"):
        dest = pkg / path.relative_to(ROOT)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(path.read_text())
    sharding = pkg / "core" / "sharding.py"
    sharding.write_text(sharding.read_text() + "\nfrom emor3_jax.rl import learner  # noqa\n")
    bad = violations(pkg)
    assert len(bad) == 1 and "core imports emor3_jax.rl" in bad[0], bad
