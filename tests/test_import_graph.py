"""The import structure of ``megatron_patch`` and ``toolkits``: no cycles, layers one way.

The graph is built from the source (``ast``): every import statement counts, those inside functions too, since
a lazy import only hides a cycle until the day both modules are needed at import time. An edge goes to the
most specific module an import names (``from a.b import c`` -> ``a.b.c`` when that is a module, else ``a.b``).
Nothing is allow-listed.
"""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("megatron_patch", "toolkits")

# Lowest first: a module may import its own layer and the ones below it, never one above.
LAYERS = (
    ("megatron_patch.dtypes", "megatron_patch.safety", "megatron_patch.parallel", "megatron_patch.jsonio",
     "megatron_patch.data_checks"),
    ("megatron_patch.runtime",),
    ("megatron_patch.fusions",),
    ("megatron_patch.models",),
    # LoRA's adapter tensors are weight mappings the sources load like base weights (config + mapping, below
    # checkpointing); the adapters on the model load through those sources (the rest of lora/, above it).
    ("megatron_patch.lora.config", "megatron_patch.lora.mapping"),
    ("megatron_patch.checkpointing",),
    ("megatron_patch.lora",),
    ("megatron_patch.training",),
    ("megatron_patch.pretrain", "megatron_patch.integrations", "toolkits"),
    ("megatron_patch.testing",),  # shared by tests, benchmarks and scripts; never imported by the library
)


def modules() -> dict[str, str]:
    """Dotted module name -> file, for every module of the packages (a package is its ``__init__``)."""
    out = {}
    for pkg in PACKAGES:
        for dirpath, _, files in os.walk(os.path.join(ROOT, pkg)):
            for name in files:
                if name.endswith(".py"):
                    parts = os.path.relpath(os.path.join(dirpath, name), ROOT)[:-3].split(os.sep)
                    out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = os.path.join(dirpath, name)
    return out


def import_graph(mods: dict[str, str]) -> dict[str, set[str]]:
    def known(name: str):
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {m: set() for m in mods}
    for m, path in mods.items():
        package = m if path.endswith("__init__.py") else m.rpartition(".")[0]
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [known(a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else known(base) for a in node.names]
            graph[m].update(t for t in targets if t and t != m)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as a sorted list."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer_of(module: str) -> int:
    for i, names in enumerate(LAYERS):
        if any(module == n or module.startswith(n + ".") for n in names):
            return i
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS")


def test_no_import_cycles_counting_lazy_imports():
    graph = import_graph(modules())
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(
        " <-> ".join(c) + "\n    " + "; ".join(f"{a} -> {sorted(b for b in graph[a] if b in c)}" for a in c)
        for c in found)


def test_layers_import_one_way():
    graph = import_graph(modules())
    upward = sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets if layer_of(b) > layer_of(a))
    assert not upward, "imports of a higher layer:\n" + "\n".join(upward)


def test_the_checks_see_what_they_must():
    """The graph finds lazy and relative imports, and the cycle search reports a cycle."""
    graph = import_graph(modules())
    # A function-level import (pretrain imports the trainer inside run()).
    assert "megatron_patch.training.trainer" in graph["megatron_patch.pretrain"]
    assert "megatron_patch.parallel" in graph["megatron_patch.runtime"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer_of("megatron_patch.models.builder") < layer_of("megatron_patch.checkpointing.placement")
