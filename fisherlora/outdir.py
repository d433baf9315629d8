"""Output directories: checked before any work, written atomically (a temporary sibling renamed
at the end), so a failure leaves nothing behind."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["check_output_dir", "atomic_output_dir"]


def check_output_dir(out_dir, *, overwrite: bool = False) -> Path:
    """``out_dir`` as an absolute Path, if it may be written; creates nothing.

    The path is normalised first (``a/../b`` is ``b``), so the check looks at the directory that
    will really be replaced, even when ``a`` does not exist yet.

    Raises:
        FileExistsError: it exists and is non-empty and ``overwrite`` is false, it is a file, or
            its nearest existing ancestor is not a writable directory.
    """
    out = Path(os.path.abspath(out_dir))
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not overwrite)):
        what = "is a file" if not out.is_dir() else "exists and is not empty"
        raise FileExistsError(f"output {str(out)!r} {what}; choose another path or pass --overwrite")
    ancestor = out.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise FileExistsError(f"cannot create output {str(out)!r}: {str(ancestor)!r} is not a writable directory")
    return out


@contextlib.contextmanager
def atomic_output_dir(out_dir, *, overwrite: bool = False):
    """Yield a temporary directory that replaces ``out_dir`` only if the block succeeds.

    Raises:
        FileExistsError: ``out_dir`` exists and is non-empty and ``overwrite`` is false
            (checked before any work), or ``out_dir`` is a file.
    """
    out = check_output_dir(out_dir, overwrite=overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            trash = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(trash)
            tmp.rename(out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
