"""The package's shape: no import cycles (function-level imports included), command-line code only
in `cli`/`__main__` modules, and each heavy dependency imported from its one home."""

from __future__ import annotations

import ast
import subprocess
import sys
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


def test_no_dead_code():
    """vulture finds nothing unused in src/ at 80% confidence, except what tests/vulture_allowlist.py
    keeps with its reason."""
    allowlist = Path(__file__).with_name("vulture_allowlist.py")
    proc = subprocess.run([sys.executable, "-m", "vulture", str(PACKAGE), str(allowlist), "--min-confidence", "80"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# The layer map of ../shared/ARCHITECTURE.md, top to bottom: a module imports from its own row or
# the rows below, never from a row above. Command-line modules (`cli`, `__main__`) are the top row.
LAYERS = (
    ("entry points", ()),  # every gpt2_jax.*.cli and gpt2_jax.*.__main__
    ("workflows", ("gpt2_jax.train", "gpt2_jax.train.loop", "gpt2_jax.train.hooks", "gpt2_jax.train.preemption",
                   "gpt2_jax.train.watchdog", "gpt2_jax.train.pod", "gpt2_jax.train.supervisor", "gpt2_jax.train.plan", "gpt2_jax.eval", "gpt2_jax.eval.report", "gpt2_jax.generate.tasks",
                   "gpt2_jax.finetune", "gpt2_jax.harness", "gpt2_jax.harness.adapter", "gpt2_jax.plot")),
    # The compiled-program analysis (HLO reading, collective theory), outside the library's own
    # graph: only the dry run (train.plan), the benchmarks and the tests use it.
    ("analysis", ("gpt2_jax.hlo", "gpt2_jax.hlo.theory", "gpt2_jax.hlo.target")),
    ("engines", ("gpt2_jax.eval.scoring", "gpt2_jax.generate", "gpt2_jax.eval.tasks", "gpt2_jax.eval.*")),
    ("model access", ("gpt2_jax.weights", "gpt2_jax.convert")),
    ("state", ("gpt2_jax.checkpoint", "gpt2_jax.checkpoint.items", "gpt2_jax.checkpoint.agreement", "gpt2_jax.run_dir", "gpt2_jax.metrics")),
    ("steps", ("gpt2_jax.step", "gpt2_jax.optim")),
    ("model", ("gpt2_jax.model", "gpt2_jax.attention")),
    ("placement", ("gpt2_jax.sharding", "gpt2_jax.memory", "gpt2_jax.costs")),
    ("leaves", ("gpt2_jax.config", "gpt2_jax.train.config", "gpt2_jax.tokenizer", "gpt2_jax.data", "gpt2_jax.data.*",
                "gpt2_jax.storage", "gpt2_jax.files", "gpt2_jax.launch", "gpt2_jax.jsonl", "gpt2_jax.errors", "gpt2_jax.published",
                "gpt2_jax")),  # the package's docstring
)


def layer_of(name: str) -> int:
    """The row of the map that module `name` belongs to (0 = the top)."""
    if name.rsplit(".", 1)[-1] in ("cli", "__main__"):
        return 0
    for row, (_, members) in enumerate(LAYERS):
        if name in members:
            return row
    for row, (_, members) in enumerate(LAYERS):  # package wildcards, after the exact names
        if any(m.endswith(".*") and name.startswith(m[:-1]) for m in members):
            return row
    raise AssertionError(f"{name} has no place in the layer map (tests/test_architecture.py LAYERS)")


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return [f"{name} ({LAYERS[layer_of(name)][0]}) imports {dep} ({LAYERS[layer_of(dep)][0]})"
            for name in sorted(graph) for dep in sorted(graph[name]) if layer_of(dep) < layer_of(name)]


def test_every_module_has_a_place_in_the_map():
    for name in MODULES:
        layer_of(name)


def test_imports_go_down_the_layer_map():
    assert upward_imports(GRAPH) == []


def test_the_layer_check_finds_an_upward_import():
    graph = {"gpt2_jax.model": {"gpt2_jax.weights"}, "gpt2_jax.weights": {"gpt2_jax.model"}, "gpt2_jax.train.cli": {"gpt2_jax.train.loop"}}
    assert upward_imports(graph) == ["gpt2_jax.model (model) imports gpt2_jax.weights (model access)"]


MAX_MODULE_LINES, MAX_FUNCTION_LINES = 600, 60


def test_modules_and_functions_stay_small():
    """No module in src/ over 600 lines, no function over 60: a newcomer reads each on a screen or two."""
    too_long = []
    for name, path in MODULES.items():
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text, str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
                too_long.append(f"{name}.{node.name} (line {node.lineno}): {node.end_lineno - node.lineno + 1} lines")
    assert not too_long, "; ".join(too_long)


_GLOBAL_STATE = """
import copy, importlib, logging, signal, sys, warnings
import fsspec
from absl import logging as absl_logging
import jax

def state():
    return {
        "root handlers": list(logging.getLogger().handlers), "root level": logging.getLogger().level,
        "absl stream": absl_logging.get_absl_handler().python_handler.stream,
        "unraisablehook": sys.unraisablehook, "excepthook": sys.excepthook,
        "signals": [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)],
        "fsspec": copy.deepcopy(fsspec.config.conf), "warnings": list(warnings.filters),
        "jax": {k: getattr(jax.config, k) for k in ("jax_enable_x64", "jax_default_matmul_precision",
                                                     "jax_numpy_rank_promotion", "jax_platforms")},
    }

for name in sys.argv[2].split(","):  # the libraries the package imports, first: their own import-time setup
    try:
        importlib.import_module(name)
    except ImportError:
        pass
before = state()
for name in sys.argv[1].split(","):
    importlib.import_module(name)
after = state()
changed = [k for k in before if before[k] != after[k]]
print("changed:", changed)
sys.exit(1 if changed else 0)
"""


def test_importing_the_package_changes_no_global_setting():
    """Importing any module of the package changes no setting of another library or of the process
    (log handlers, hooks, signal handlers, fsspec's config, warning filters, jax flags)."""
    ours = [n for n in MODULES if not n.endswith("__main__")]
    theirs = set()
    for name in ours:
        for node in ast.walk(ast.parse(MODULES[name].read_text())):
            if isinstance(node, ast.Import):
                theirs.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                theirs.add(node.module)
    theirs = sorted(t for t in theirs if not t.startswith("gpt2_jax"))
    proc = subprocess.run([sys.executable, "-c", _GLOBAL_STATE, ",".join(ours), ",".join(theirs)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
