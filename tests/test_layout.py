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


# Run from the repository root, as tests, CI and examples do: there `sys.path[0]` is the root.
_KERNELS_FROM_THE_ROOT = r'''
import importlib, os, site, sys
root = os.getcwd()

def ours(module):
    """Whether a module is code of this repository (a namespace package holds no code). An
    environment created inside the root (CI's .venv/) is not: Hugging Face's `kernels`, a
    dependency of transformers, is installed there."""
    path = os.path.realpath(getattr(module, "__file__", None) or "")
    installed = {os.path.realpath(p) + os.sep for p in (sys.prefix, sys.base_prefix, *site.getsitepackages())}
    return path.startswith(os.path.realpath(root) + os.sep) and not any(path.startswith(p) for p in installed)

# 1. a plain `import kernels` is never our Triton code: not found, or Hugging Face's package
try:
    import kernels
except ModuleNotFoundError:
    kernels = None
assert kernels is None or not ours(kernels), f"`import kernels` gave {kernels.__file__}"
# ... nor can our modules be imported under that name (the custom ops would be registered twice)
for sub in ("_common", "syrk", "fisher_energy", "projected_sq"):
    try:
        mod = importlib.import_module("kernels." + sub)
    except ImportError:
        continue
    assert not ours(mod), f"kernels.{sub} imported our Triton code as {mod.__name__}"
# transformers probes for Hugging Face's `kernels` (and imports what it finds)
from transformers.utils import import_utils
import_utils.is_kernels_available()
assert not ours(sys.modules.get("kernels")), "transformers found our kernels/ as `kernels`"

# 2. `fisherlora.kernels` is the Triton backend, from the same tree as the fisherlora imported
import torch
import fisherlora
import fisherlora.kernels as fk
from fisherlora import ops
package = os.path.dirname(fisherlora.__file__)
where = os.path.dirname(fk.syrk.__file__)
assert where in (os.path.join(package, "kernels"), os.path.join(os.path.dirname(package), "kernels")), where
assert fk.supports("cpu"), "TRITON_INTERPRET=1 is set: the Triton backend runs on the CPU"
g = torch.Generator().manual_seed(0)
x, Q = torch.randn(2, 5, 8, generator=g), torch.randn(8, 3, generator=g)
mask = torch.rand(2, 5, generator=g) > 0.3
acc = ops.syrk_accumulate_(torch.zeros(8, 8), x, mask, backend="triton")
ref = ops.syrk_accumulate_(torch.zeros(8, 8, dtype=torch.float64), x.double(), mask, backend="torch")
torch.testing.assert_close(acc.triu().double(), ref.triu(), rtol=1e-5, atol=1e-5)
proj = fk.projected_sq_accumulate_(torch.zeros(3), x, Q, mask)
torch.testing.assert_close(proj.double(), ops.fisher_energy(ref.triu() + ref.triu(1).mT, Q.double()),
                           rtol=1e-4, atol=1e-4)
print("ok")
'''


def test_the_kernels_folder_is_fisherlora_kernels_only_and_shadows_no_package():
    """The top-level kernels/ holds the Triton sources of fisherlora.kernels, and nothing else
    finds them (docs/DESIGN.md §5): from the repository root, `import kernels` must not give our
    code, which shadowed Hugging Face's `kernels` package that bitsandbytes and transformers look
    for (and importing it a second time registered the custom ops twice: a segfault later)."""
    import importlib.util
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1"), "HF_HUB_OFFLINE": "1"}
    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed")
    proc = subprocess.run([sys.executable, "-c", _KERNELS_FROM_THE_ROOT], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
    if importlib.util.find_spec("bitsandbytes") is not None:
        # bitsandbytes imports `kernels` for a CPU kernel: whatever it reports, not our folder
        proc = subprocess.run([sys.executable, "-c", "import bitsandbytes"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out[-3000:]
        assert str(ROOT / "kernels") not in out and "kernels/__init__.py" not in out, out[-3000:]
