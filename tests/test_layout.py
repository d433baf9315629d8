"""The package's layout rules (docs/DESIGN.md §2): no import cycle, every module says its one
job, bench/ is never imported by the package, and no module grows past about 400 lines."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fisherlora"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every fisherlora module imported anywhere in the file (function-level imports included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        deps = {d for d in _imports(path) if d in MODULES and d != name and d != "fisherlora"}
        graph[name] = deps
    return graph


def test_the_package_has_no_import_cycle():
    graph, state, stack = _graph(), {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for d in sorted(graph[n]):
            if state.get(d) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[n] = "done"

    for n in sorted(graph):
        if n not in state:
            visit(n)


def test_the_package_never_imports_bench_or_tests():
    for name, path in MODULES.items():
        bad = {d for d in _imports(path) if d.split(".")[0] in ("bench", "tests")}
        assert not bad, f"{name} imports {sorted(bad)}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_says_its_job_and_stays_small(name):
    path = MODULES[name]
    tree = ast.parse(path.read_text())
    assert ast.get_docstring(tree), f"{name} has no opening docstring saying its job"
    assert len(path.read_text().splitlines()) <= 420, f"{name} has grown past about 400 lines"


def test_tests_import_bench_only_in_the_benchmark_smoke_tests():
    for path in sorted((ROOT / "tests").glob("*.py")):
        uses = {d for d in _imports(path) if d.split(".")[0] == "bench"}
        if uses:
            assert path.name.startswith("test_bench_"), f"{path.name} imports {sorted(uses)}"


def test_every_design_reference_resolves_inside_the_repository():
    """Code and docs cite docs/DESIGN.md by section; each cited section exists."""
    import re

    design = (ROOT / "docs/DESIGN.md").read_text()
    sections = set(re.findall(r"^## (\d+)\.", design, flags=re.M))
    files = [p for d in ("fisherlora", "kernels", "csrc", "bench", "tests") for p in (ROOT / d).rglob("*")
             if p.is_file() and p.suffix in (".py", ".cpp", ".cu", ".h", ".sh", ".md")]
    files += [ROOT / "README.md", ROOT / "setup.py"]
    for path in files:
        text = path.read_text()
        for m in re.finditer(r"(\S*)DESIGN\.md(?: §(\d+))?", text):
            assert m.group(1).endswith("docs/") or path.parent.name == "docs", (
                f"{path.relative_to(ROOT)} cites {m.group(0)!r}: the design is docs/DESIGN.md")
            assert m.group(2) is None or m.group(2) in sections, f"{path.relative_to(ROOT)}: no §{m.group(2)}"
