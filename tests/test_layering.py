"""The package's imports run one way: errors/config/utils -> video -> data -> backbones, heads -> features
-> engine -> inference, experiments -> cli (docs/architecture.md). Parsed from the source, not imported."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "catnet"

# top-level part of a module name -> layer; a module may import its own part and lower layers only
LAYERS = {"errors": 0, "config": 0, "version": 0, "utils": 0, "video": 1, "data": 2, "backbones": 3,
          "heads": 3, "features": 4, "engine": 5, "inference": 6, "experiments": 6, "cli": 7}


def _modules() -> dict[str, Path]:
    out = {}
    for p in PACKAGE.rglob("*.py"):
        parts = p.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The catnet modules `path` imports (anywhere in the file), resolved to existing modules."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name.startswith("catnet"):
                found.add(name)
    return found


def _part(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def test_every_top_level_part_has_a_layer():
    parts = {_part(m) for m in _modules()} - {"", "__main__"}
    assert parts <= set(LAYERS), parts - set(LAYERS)


def test_imports_only_go_down_the_layers():
    modules = _modules()
    wrong = []
    for name, path in modules.items():
        src = _part(name)
        if src in ("", "__main__"):  # the package itself resolves its public names lazily
            continue
        for target in _imports(path, modules):
            dst = _part(target)
            if dst in ("", src):
                continue
            if LAYERS[dst] > LAYERS[src] or (LAYERS[dst] == LAYERS[src] and LAYERS[src] > 0):
                wrong.append(f"{name} -> {target}")
    assert not wrong, wrong


def test_no_import_cycles():
    modules = _modules()
    graph = {m: {t for t in _imports(p, modules) if t != m and not m.startswith(t + ".")}
             for m, p in modules.items()}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in graph[m]:
            if state.get(t) == 1:
                raise AssertionError(" -> ".join(path[path.index(t):] + [m, t]))
            if t not in state:
                visit(t, path + [m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])


def test_no_verb_imports_another_verb():
    modules = _modules()
    verbs = {m for m in modules if m.startswith("catnet.cli.")}
    crossing = [f"{v} -> {t}" for v in verbs for t in _imports(modules[v], modules) if t in verbs and t != v]
    assert not crossing, crossing
