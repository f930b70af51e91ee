"""The layout's rules, checked on the source: an acyclic import graph, layers that import only downwards, short
functions, no private names imported across modules, no repeated blocks (lora_jax/ and train/)."""

import ast
import collections
import os
import re

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


@pytest.mark.parametrize(
    "layer,forbidden",
    [
        ("lora_jax.lora", ("lora_jax.models", "lora_jax.checkpoints", "lora_jax.training")),
        ("lora_jax.sharding", ("lora_jax.models", "lora_jax.checkpoints")),
        ("lora_jax.models", ("lora_jax.lora", "lora_jax.checkpoints", "lora_jax.training")),
        ("lora_jax.quantization", ("lora_jax.lora", "lora_jax.models", "lora_jax.checkpoints", "lora_jax.training")),
    ],
)
def test_layers_import_only_downwards(layer, forbidden):
    bad = [
        f"{name} imports {m}"
        for name in MODULES if name == layer or name.startswith(layer + ".")
        for m, _ in _imports(name) if m in PACKAGES or m.startswith(forbidden)
    ]
    assert not bad, bad


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
