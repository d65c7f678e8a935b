"""The package's shape: no import cycles (function-level imports included), command-line code only
in `cli`/`__main__` modules, and each heavy dependency imported from its one home."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "gpt2_jax"


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str) -> set[str]:
    """The gpt2_jax modules `name` imports anywhere in its body (top level or inside functions)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # `from pkg import mod` imports the module pkg.mod when there is one, else names of pkg.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        out.update(t for t in targets if t in MODULES and t != name)
    return out


GRAPH = {name: _imports(name) for name in MODULES}


def test_the_graph_sees_the_package():
    assert {"gpt2_jax.model", "gpt2_jax.weights", "gpt2_jax.train.loop", "gpt2_jax.eval.cli"} <= set(MODULES)
    assert "gpt2_jax.model" in GRAPH["gpt2_jax.weights"] and "gpt2_jax.weights" in GRAPH["gpt2_jax.train.loop"]


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        path.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return path[path.index(m):] + [m]
            if m not in state and (cycle := visit(m)):
                return cycle
        path.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (cycle := visit(n)):
            return cycle
    return None


def test_no_import_cycles():
    cycle = _find_cycle(GRAPH)
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def _imported_top_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_command_line_code_lives_in_cli_modules():
    for name, path in MODULES.items():
        is_cli = path.name in ("cli.py", "__main__.py")
        tree = ast.parse(path.read_text(), str(path))
        defines_main = any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body)
        if not is_cli:
            assert "argparse" not in _imported_top_names(path), f"{name} imports argparse outside a cli module"
            assert not defines_main, f"{name} defines main() outside a cli module"


# Each heavy dependency has one home (../shared/STYLE.md): Orbax in checkpoint, TFDS and Grain in
# the data package (pyarrow too: FineWeb-Edu's parquet files), tiktoken in tokenizer, torch only in
# convert (to read pytorch_model.bin), lm-evaluation-harness only in the harness's adapter.
HOMES = {
    "orbax": ("gpt2_jax.checkpoint",),
    "tensorflow_datasets": ("gpt2_jax.data",),
    "grain": ("gpt2_jax.data",),
    "pyarrow": ("gpt2_jax.data",),
    "tiktoken": ("gpt2_jax.tokenizer",),
    "lm_eval": ("gpt2_jax.harness.adapter",),
    "torch": ("gpt2_jax.convert",),
    "transformers": (),
}


def test_heavy_dependencies_have_one_home():
    for name, path in MODULES.items():
        for dep in _imported_top_names(path) & set(HOMES):
            assert any(name == home or name.startswith(home + ".") for home in HOMES[dep]), f"{name} imports {dep}"
