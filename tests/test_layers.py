"""The package's layers, checked by parsing every import (imports inside functions count).

Lowest first: ``cache`` <- ``pipeline`` (the engine) <- domain packages <- ``cli``/``demo``.
Nothing imports upward, no module import cycle exists, the packages depend on each other one way
only (``PACKAGE_ORDER``), no module imports its own package's ``__init__``, and imports sit at the
top of their module except the few that keep a heavy optional dependency off a path.
"""

from __future__ import annotations

import ast
import os

import soundstage

ROOT = os.path.dirname(soundstage.__file__)
DOMAIN = ("stages", "models", "llm", "manifests", "audio", "device", "train", "metrics")
TOP = ("cli", "demo", "evaluate")

#: the top-level packages and modules of soundstage, lowest first: each may import only those
#: before it. Two packages that need the same code get it from one below both (e.g. the masks
#: stage reopens a trained run through ``train.inference``; training finds stages through the
#: engine's registry, ``soundstage.pipeline.registry.get_stage``, never by importing ``stages``).
PACKAGE_ORDER = (
    "cache",
    "pipeline",
    "audio",
    "device",
    "manifests",
    "metrics",
    "llm",
    "models",
    "train",
    "stages",
    "evaluate",
    "cli",
    "demo",
)


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


def test_packages_depend_on_each_other_one_way():
    rank = {name: i for i, name in enumerate(PACKAGE_ORDER)}
    violations = []
    for module, imported in sorted(_imports().items()):
        package = _layer(module)
        if package == "soundstage":
            continue
        assert package in rank, f"{module}: package {package!r} is not in PACKAGE_ORDER; place it there"
        for target in sorted(imported):
            other = _layer(target)
            if other not in ("soundstage", package) and rank[other] > rank[package]:
                violations.append(f"{module} -> {target} ({package} is below {other} in PACKAGE_ORDER)")
    assert not violations, "package imports against PACKAGE_ORDER:\n" + "\n".join(violations)


def test_no_module_imports_its_own_package_init():
    """``from soundstage.metrics import binary`` inside ``soundstage.metrics`` runs the package's
    ``__init__`` from inside itself; import the submodule by its full name instead."""
    violations = []
    for base, _dirs, files in os.walk(ROOT):
        for name in files:
            if not name.endswith(".py") or name == "__init__.py" or base == ROOT:
                continue
            path = os.path.join(base, name)
            package = _module_name(os.path.join(base, "__init__.py"))
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read(), path)
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and (node.module == package or (node.level and not node.module)):
                    violations.append(f"{_module_name(path)}:{node.lineno} imports from {package}")
    assert not violations, "modules importing their own package:\n" + "\n".join(violations)


#: the most imports inside functions there may be; each keeps a heavy optional library off a path
#: that does not need it (transformers, matplotlib, faiss, scikit-learn, huggingface_hub; torch in
#: what decoding workers import) and says so in a comment
MAX_FUNCTION_LEVEL_IMPORTS = 40


def _function_level_imports() -> list[tuple[str, int, bool]]:
    """(module file, line, explained) of every import inside a function. An import is explained
    by a comment on its line, on the line above, or on the first import of its group."""
    found = []
    for base, _dirs, files in os.walk(ROOT):
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(base, name)
            with open(path, encoding="utf-8") as f:
                source = f.read()
            lines = source.splitlines()
            nodes = set()
            for node in ast.walk(ast.parse(source, path)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    nodes.update(n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom)))
            explained_lines = set()
            for node in sorted(nodes, key=lambda n: n.lineno):
                line = lines[node.lineno - 1]
                above = lines[node.lineno - 2].strip() if node.lineno > 1 else ""
                explained = "#" in line or above.startswith("#") or (node.lineno - 1) in explained_lines
                if explained:
                    explained_lines.add(node.end_lineno)
                found.append((os.path.relpath(path, os.path.dirname(ROOT)), node.lineno, explained))
    return found


def test_imports_sit_at_the_top_of_their_module():
    imports = _function_level_imports()
    listing = "\n".join(f"  {path}:{line}" for path, line, _ in imports)
    assert len(imports) <= MAX_FUNCTION_LEVEL_IMPORTS, (
        f"{len(imports)} imports inside functions (at most {MAX_FUNCTION_LEVEL_IMPORTS}): move them to the top of "
        f"their module unless they keep a heavy optional library off a path that does not need it\n{listing}"
    )
    unexplained = [f"  {path}:{line}" for path, line, explained in imports if not explained]
    assert not unexplained, "imports inside functions without a comment saying why:\n" + "\n".join(unexplained)
