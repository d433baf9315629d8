"""The source distribution can build the package: it carries every tracked file the build reads
(the compiled extension's sources and headers, the Triton kernels, the bundled configs)."""

import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tracked(*folders: str) -> set[str]:
    out = subprocess.run(["git", "ls-files", *folders], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    return set(out.stdout.split())


def test_sdist_carries_every_source_the_build_reads(tmp_path):
    tracked = _tracked("csrc", "kernels", "fisherlora", "setup.py", "pyproject.toml", "README.md")
    assert tracked, "no tracked sources found"
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(tmp_path)], cwd=ROOT, check=True,
                   capture_output=True, timeout=300)
    (archive,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    missing = sorted(t for t in tracked if t not in names)
    assert not missing, f"the sdist lacks {missing}"
