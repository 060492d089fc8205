"""The house's floors (docs/ARCHITECTURE.md): imports point down, never up, never in a circle, and
the library never imports Prefect. Every import statement counts, the ones inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "pab_build"
FLOWS = PKG.parent / "flows"

# top to bottom; a module may import its own wing and any floor below it, nothing above or beside it
FLOORS = [
    ("flows",),
    ("release", "cmp"),
    ("stages",),
    ("shards", "models", "text"),
    ("engine",),
    ("core", "fixtures"),
]
FLOOR_OF = {wing: i for i, wings in enumerate(FLOORS) for wing in wings}
ROOT_LIMIT, LINE_LIMIT = 8, 450
CORE_PACKAGES = {"config"}  # core modules that grew into a package: config/ (loading) + config/sections.py


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _wing(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "flows":
        return "flows"
    if len(parts) == 1:
        return "core"  # the package itself
    sub = parts[1]
    if sub in CORE_PACKAGES:
        return "core"
    return sub if (PKG / sub).is_dir() else "core"


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in ``path``; ``from . import x`` names x's module."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((node.lineno, target))
            for a in node.names:  # "from pab_build.text import wordnet": the module wordnet
                sub = f"{target}.{a.name}"
                if _resolves(sub):
                    out.append((node.lineno, sub))
    return out


def _resolves(module: str) -> bool:
    if not module.startswith(("pab_build", "flows")):
        return False
    rel = Path(*module.split("."))
    base = PKG.parent / rel
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _sources() -> list[Path]:
    return sorted(PKG.rglob("*.py")) + sorted(FLOWS.rglob("*.py"))


def _edges() -> list[tuple[str, int, str]]:
    edges = []
    for path in _sources():
        src = _module_name(path)
        for line, target in _imports(path):
            if target.startswith(("pab_build", "flows")) and _resolves(target) and target != src:
                edges.append((src, line, target))
    return edges


def test_imports_point_down_the_floors():
    upward = []
    for src, line, target in _edges():
        a, b = _wing(src), _wing(target)
        if a == b or target == "pab_build":
            continue
        if FLOOR_OF[b] <= FLOOR_OF[a]:
            upward.append(f"{src}:{line} imports {target} ({a} -> {b})")
    assert not upward, "imports that point up or sideways:\n" + "\n".join(upward)


def test_no_import_cycles():
    graph: dict[str, set[str]] = {}
    for src, _, target in _edges():
        graph.setdefault(src, set()).add(target)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt.startswith(node + ".") or node.startswith(nxt + "."):
                continue  # a package and its own modules
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_the_library_never_imports_prefect():
    found = [f"{_module_name(p)}:{line}" for p in sorted(PKG.rglob("*.py"))
             for line, target in _imports(p) if target.split(".")[0] == "prefect"]
    assert not found, f"pab_build imports Prefect (orchestration belongs in flows/): {found}"


def test_the_root_holds_the_core_only_and_modules_stay_small():
    root = sorted(p.name for p in PKG.glob("*.py") if p.name != "__init__.py")
    assert len(root) <= ROOT_LIMIT, f"pab_build/ root holds {len(root)} modules: {root}"
    long = [f"{p.relative_to(PKG.parent)} ({n})" for p in sorted(PKG.rglob("*.py"))
            if "fixtures" not in p.parts and (n := len(p.read_text(encoding="utf-8").splitlines())) > LINE_LIMIT]
    assert not long, f"modules over {LINE_LIMIT} lines: {long}"


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    """The rule can fail: an engine module that imports a stage is caught."""
    fake = PKG / "engine" / "_layering_probe.py"
    fake.write_text("from ..stages import pose\n", encoding="utf-8")
    try:
        bad = [e for e in _edges() if e[0] == "pab_build.engine._layering_probe"]
        assert bad and FLOOR_OF[_wing(bad[0][2])] < FLOOR_OF["engine"]
    finally:
        fake.unlink()
