"""The package's layers, checked by parsing every import (imports inside functions count).

Lowest first: ``cache`` <- ``pipeline`` (the engine) <- domain packages <- ``cli``/``demo``.
Nothing imports upward, and no module import cycle exists.
"""

from __future__ import annotations

import ast
import os

import soundstage

ROOT = os.path.dirname(soundstage.__file__)
DOMAIN = ("stages", "models", "llm", "manifests", "audio", "train", "metrics")
TOP = ("cli", "demo")


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(ROOT))[: -len(".py")].replace(os.sep, ".")
    return rel.removesuffix(".__init__")


def _imports() -> dict[str, set[str]]:
    """module -> the soundstage modules it imports (anywhere in the file)."""
    out = {}
    for base, _dirs, files in os.walk(ROOT):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(base, name)
            module = _module_name(path)
            package = module if name == "__init__.py" else module.rpartition(".")[0]
            found = set()
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read(), path)
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    found.update(a.name for a in node.names)
                elif isinstance(node, ast.ImportFrom):
                    if node.level:  # relative import
                        parent = package.split(".")
                        parent = parent[: len(parent) - node.level + 1]
                        target = ".".join(parent + ([node.module] if node.module else []))
                    else:
                        target = node.module
                    # `from pkg import name`: the submodule pkg.name when there is one, else pkg
                    found.update(f"{target}.{a.name}" if _is_module(f"{target}.{a.name}") else target for a in node.names)
            out[module] = {m for m in found if _is_module(m)} - {module}
    return out


def _is_module(name: str) -> bool:
    if name != "soundstage" and not name.startswith("soundstage."):
        return False
    path = os.path.join(os.path.dirname(ROOT), *name.split("."))
    return os.path.isfile(path + ".py") or os.path.isfile(os.path.join(path, "__init__.py"))


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "soundstage"


def test_layers_import_nothing_above_them():
    violations = []
    for module, imported in sorted(_imports().items()):
        layer = _layer(module)
        for target in sorted(imported):
            up = _layer(target)
            if layer == "cache" and up in ("pipeline", *DOMAIN, *TOP):
                violations.append(f"{module} -> {target}")
            if layer == "pipeline" and up in (*DOMAIN, *TOP):
                violations.append(f"{module} -> {target}")
            if layer in DOMAIN and up in TOP:
                violations.append(f"{module} -> {target}")
    assert not violations, "imports against the layers:\n" + "\n".join(violations)


def test_no_module_import_cycle():
    graph = _imports()
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "active"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "active":
                cycles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycles, "module import cycles:\n" + "\n".join(cycles)
