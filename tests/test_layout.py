"""The layout's rules, checked on the source: an acyclic import graph, layers that import only what
ALLOWED_IMPORTS lets them (docs/architecture.md), at most three loose modules, each module importable on its own, short
functions, no private names imported across modules, no repeated blocks (lora_jax/ and train/)."""

import ast
import collections
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("lora_jax", "train")
MAX_FUNCTION_LINES = 60
MIN_REPEATED_LINES = 6


def _modules() -> dict[str, str]:
    """{dotted module name: path} of every module in PACKAGES (a package is named by its __init__)."""
    out = {}
    for package in PACKAGES:
        for directory, _, files in os.walk(os.path.join(ROOT, package)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(directory, f), ROOT)[:-3].split(os.sep)
                    out[".".join(rel[:-1] if rel[-1] == "__init__" else rel)] = os.path.join(directory, f)
    return out


MODULES = _modules()
TREES = {name: ast.parse(open(path).read(), path) for name, path in MODULES.items()}


def _imports(name: str) -> list[tuple[str, str]]:
    """(imported module, imported name or '') for each import in module `name`, function-level ones included,
    resolved to our modules: `from lora_jax import sharding` is lora_jax.sharding."""
    out = []
    for node in ast.walk(TREES[name]):
        if isinstance(node, ast.Import):
            out += [(a.name, "") for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.append((sub, "") if sub in MODULES else (node.module, a.name))
    return [(m, n) for m, n in out if m.split(".")[0] in PACKAGES]


def _graph() -> dict[str, set[str]]:
    return {name: {m for m, _ in _imports(name) if m in MODULES and m != name} for name in MODULES}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a list of nodes, or None (depth-first search)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def _package_of(module: str) -> str:
    """lora_jax.lora.transform -> lora_jax.lora; lora_jax.sharding -> lora_jax.sharding; train.loop -> train.loop."""
    parts = module.split(".")
    return ".".join(parts[:2])


def test_module_import_graph_is_acyclic():
    assert _cycle(_graph()) is None, " -> ".join(_cycle(_graph()))


def test_package_import_graph_is_acyclic():
    packages = collections.defaultdict(set)
    for module, imported in _graph().items():
        if module in PACKAGES:  # a top-level __init__ gathers the public API: it imports everything by design
            continue
        packages[_package_of(module)] |= {_package_of(m) for m in imported if m not in PACKAGES} - {_package_of(module)}
    assert _cycle(packages) is None, " -> ".join(_cycle(packages))


# What each part of lora_jax may import from lora_jax (docs/architecture.md draws it): lower layers never import
# higher ones, lora/ knows no model, and nothing in lora_jax imports the train/ scripts.
ALLOWED_IMPORTS = {
    "lora_jax.tree": (),
    "lora_jax.ranges": (),
    "lora_jax.dropout": (),
    "lora_jax.quantization": ("lora_jax.tree", "lora_jax.ranges"),
    "lora_jax.sharding": ("lora_jax.tree", "lora_jax.ranges"),
    "lora_jax.lora": ("lora_jax.tree", "lora_jax.ranges", "lora_jax.dropout", "lora_jax.quantization"),
    "lora_jax.models": ("lora_jax.tree", "lora_jax.ranges", "lora_jax.dropout", "lora_jax.quantization"),
    "lora_jax.data": ("lora_jax.tree", "lora_jax.ranges", "lora_jax.dropout", "lora_jax.models"),
    "lora_jax.training": ("lora_jax.tree", "lora_jax.ranges", "lora_jax.dropout", "lora_jax.quantization", "lora_jax.sharding",
                          "lora_jax.lora", "lora_jax.models"),
    "lora_jax.generation": ("lora_jax.tree", "lora_jax.ranges", "lora_jax.dropout", "lora_jax.quantization", "lora_jax.lora",
                            "lora_jax.models", "lora_jax.training"),
    "lora_jax.checkpoints": ("lora_jax.tree", "lora_jax.ranges", "lora_jax.dropout", "lora_jax.quantization", "lora_jax.sharding",
                             "lora_jax.lora", "lora_jax.models", "lora_jax.training", "lora_jax.generation"),
}
MAX_LOOSE_MODULES = 3


@pytest.mark.parametrize("layer", sorted(ALLOWED_IMPORTS))
def test_layers_import_only_what_they_may(layer):
    allowed = (layer,) + ALLOWED_IMPORTS[layer]
    bad = [
        f"{name} imports {m}"
        for name in MODULES if name == layer or name.startswith(layer + ".")
        for m, _ in _imports(name) if _package_of(m) not in allowed
    ]
    assert not bad, f"{bad}: allowed are {allowed} (tests/test_layout.py ALLOWED_IMPORTS, docs/architecture.md)"


def test_every_part_of_lora_jax_has_import_rules():
    parts = {_package_of(name) for name in MODULES if name.startswith("lora_jax.")}
    assert parts == set(ALLOWED_IMPORTS), f"add {parts - set(ALLOWED_IMPORTS)} to ALLOWED_IMPORTS and the docs"


def test_few_loose_modules_at_the_top():
    loose = sorted(f for f in os.listdir(os.path.join(ROOT, "lora_jax")) if f.endswith(".py") and f != "__init__.py")
    assert len(loose) <= MAX_LOOSE_MODULES, f"{loose}: group modules by concept into a package"


def test_each_module_imports_on_its_own():
    """Each module of lora_jax/ and train/ imported first in a fresh set of our modules (third-party ones stay
    loaded, so this is quick): an import cycle that a `from x import name` turns into a partly initialised module
    fails here whatever order the suite happens to import things in."""
    code = (
        "import importlib, sys\n"
        "for name in sys.argv[1:]:\n"
        "    for loaded in [m for m in sys.modules if m.split('.')[0] in ('lora_jax', 'train')]:\n"
        "        del sys.modules[loaded]\n"
        "    importlib.import_module(name)\n"
    )
    names = sorted(n for n in MODULES if n != "train.__main__")
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code, *names], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]


def test_no_function_longer_than_the_limit():
    lengths = sorted(
        (node.end_lineno - node.lineno + 1, f"{MODULES[name]}:{node.lineno} {node.name}")
        for name, tree in TREES.items() for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    )
    print(f"longest function: {lengths[-1][1]} ({lengths[-1][0]} lines)")  # shown with pytest -s
    assert lengths[-1][0] <= MAX_FUNCTION_LINES, lengths[-5:]


def test_no_private_name_imported_across_modules():
    bad = [f"{name}: from {m} import {n}" for name in MODULES for m, n in _imports(name) if n.startswith("_")]
    bad += [
        f"{name}: {node.value.id}.{node.attr}"
        for name, tree in TREES.items() for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.attr.startswith("_")
        and not node.attr.startswith("__") and node.value.id not in ("self", "cls")
        and any(m.endswith("." + node.value.id) or m == node.value.id for m, _ in _imports(name))
    ]
    assert not bad, bad


def _code_lines(name: str) -> list[tuple[int, str]]:
    """(line number, stripped text) of the lines of function bodies: the logic. Signatures, field declarations,
    docstrings, imports, comments and bracket-only lines are left out (they repeat legitimately)."""
    numbers = set()
    for node in ast.walk(TREES[name]):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for stmt in node.body:
                if isinstance(stmt, (ast.Import, ast.ImportFrom)) or (
                    isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)
                ):
                    continue
                numbers.update(range(stmt.lineno, stmt.end_lineno + 1))
    lines = open(MODULES[name]).read().splitlines()
    out = [(i, lines[i - 1].strip()) for i in sorted(numbers)]
    return [(i, t) for i, t in out if t and not t.startswith("#") and not re.fullmatch(r"[\])},:(\[{]*", t)]


def test_no_block_repeated_within_the_packages():
    seen, repeats = {}, []
    for name in sorted(MODULES):
        lines = _code_lines(name)
        for k in range(len(lines) - MIN_REPEATED_LINES + 1):
            block = tuple(t for _, t in lines[k:k + MIN_REPEATED_LINES])
            where = f"{os.path.relpath(MODULES[name], ROOT)}:{lines[k][0]}"
            if block in seen:
                repeats.append(f"{seen[block]} ~ {where}")
            seen.setdefault(block, where)
    assert not repeats, repeats[:10]


def test_architecture_page_states_the_import_rules():
    """docs/architecture.md's package table says, for each part of lora_jax, what it may import: the same as
    ALLOWED_IMPORTS, so the page cannot drift from the rule this file enforces."""
    documented = {}
    for row in open(os.path.join(ROOT, "docs", "architecture.md")).read().splitlines():
        m = re.fullmatch(r"\| `lora_jax/(\w+)(?:/|\.py)` \|.*\| ([^|]*) \|", row)
        if m and m.group(1) != "__init__":  # the public API re-exports everything by design
            documented[f"lora_jax.{m.group(1)}"] = {w.strip() for w in m.group(2).split(",")} - {"—"}
    expected = {layer: {p.split(".")[-1] for p in allowed} for layer, allowed in ALLOWED_IMPORTS.items()}
    assert documented == expected
