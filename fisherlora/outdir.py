"""Output paths: every output path checked before any work; output directories written atomically (a
fresh sibling directory renamed into place at the end), with the permissions the umask gives, so
a failure leaves nothing behind. An existing directory is replaced only when fisherlora wrote it
(it holds the marker file ``fisherlora.json``), and never one that holds the working directory."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import warnings
from pathlib import Path

__all__ = ["MARKER_FILE", "check_output_dir", "check_output_file", "atomic_output_dir", "written_by_fisherlora"]

#: the file every fisherlora output directory holds (what the residual needs, written by
#: ``FisherLoraResult.save``, read by ``adapter.load``): it marks a directory fisherlora wrote
MARKER_FILE = "fisherlora.json"


def written_by_fisherlora(path) -> bool:
    """True if the directory ``path`` holds fisherlora's marker file (``fisherlora.json``, a JSON
    object with ``fisherlora_version``), i.e. fisherlora wrote it."""
    try:
        meta = json.loads((Path(path) / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "fisherlora_version" in meta


def check_output_dir(out_dir, *, overwrite: bool = False) -> Path:
    """The directory that writing ``out_dir`` would replace, as an absolute real path, if it may
    be written; creates and changes nothing.

    Symbolic links are followed (the output goes where the link points) and ``..`` is resolved
    the way the system does, also below directories that do not exist yet (``new/../out`` is
    ``out``). It may be written when it does not exist yet and its nearest existing ancestor is
    a writable directory, when it is an empty directory, or, with ``overwrite``, when it is a
    directory that fisherlora wrote (:func:`written_by_fisherlora`).

    Raises:
        FileExistsError: it is a file; it is non-empty without ``overwrite``; with ``overwrite``,
            fisherlora did not write it; it is (or contains) the current working directory; it,
            or a directory on the way to it, is a symbolic link to nothing; or its nearest
            existing ancestor is not a writable directory.
    """
    given = Path(os.path.join(os.getcwd(), os.fspath(out_dir)))  # absolute, '..' kept as given
    for p in (given, *given.parents):
        if p.is_symlink() and not p.exists():
            raise FileExistsError(f"cannot write output {str(out_dir)!r}: {str(p)!r} is a symbolic link to "
                                  f"{os.readlink(p)!r}, which does not exist; create it or choose another path")
    out = Path(os.path.realpath(given))
    cwd = Path(os.path.realpath(os.getcwd()))
    if out == cwd or out in cwd.parents:
        raise FileExistsError(f"output {str(out)!r} is (or contains) the current working directory, which it "
                              "would replace; choose a new directory")
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"output {str(out)!r} is a file; choose another path")
        if any(out.iterdir()):
            if not overwrite:
                raise FileExistsError(f"output {str(out)!r} exists and is not empty; choose another path or pass "
                                      "--overwrite")
            if not written_by_fisherlora(out):
                raise FileExistsError(f"output {str(out)!r} was not written by fisherlora (it holds no {MARKER_FILE} "
                                      "that fisherlora wrote): "
                                      "--overwrite replaces only a fisherlora output; choose another path")
    ancestor = out.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise FileExistsError(f"cannot create output {str(out)!r}: {str(ancestor)!r} is not a writable directory")
    return out


def check_output_file(path) -> Path:
    """``path`` as an absolute Path, if a single output file (``fisherlora plan --json``) may be
    written there; creates nothing. An existing file is replaced.

    Raises:
        FileNotFoundError: its directory does not exist.
        FileExistsError: it is a directory, or its directory is not writable.
    """
    out = Path(os.path.abspath(path))
    if out.is_symlink() and not out.exists():
        raise FileExistsError(f"output file {str(out)!r} is a symbolic link to {os.readlink(out)!r}, which does "
                              "not exist; name a file")
    if out.is_dir():
        raise FileExistsError(f"output file {str(out)!r} is a directory; name a file")
    if not out.parent.is_dir():
        what = "is not a directory" if out.parent.exists() else "does not exist"
        raise FileNotFoundError(f"cannot write {str(out)!r}: {str(out.parent)!r} {what}")
    if not os.access(out.parent, os.W_OK | os.X_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise FileExistsError(f"cannot write {str(out)!r}: not writable")
    return out


@contextlib.contextmanager
def atomic_output_dir(out_dir, *, overwrite: bool = False):
    """Yield a new, empty directory that replaces ``out_dir`` (as :func:`check_output_dir`
    resolves it) only if the block succeeds.

    The directory is created next to the output, with the permissions the umask gives a new
    directory, and every file written in it gets the umask's file permissions when it is renamed
    into place. If the block raises, nothing is left: not the directory, nor the missing parents
    made for it. The check is repeated just before an existing directory is replaced.

    Raises:
        FileExistsError: as :func:`check_output_dir`, before the block runs.
    """
    out = check_output_dir(out_dir, overwrite=overwrite)
    made = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    tmp, created = _new_sibling(out, "tmp"), False
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(tmp, 0o777)  # the umask applies, unlike tempfile.mkdtemp's 0700
        created = True
        yield tmp
        _give_umask_modes(tmp)
        _replace(tmp, check_output_dir(out, overwrite=overwrite))
    except BaseException:
        if created:
            shutil.rmtree(tmp, ignore_errors=True)
        for p in made:  # deepest first; only if still empty
            with contextlib.suppress(OSError):
                p.rmdir()
        raise


def _new_sibling(out: Path, kind: str) -> Path:
    return out.with_name(f".{out.name}.{os.getpid()}-{secrets.token_hex(4)}.{kind}")


def _give_umask_modes(root: Path) -> None:
    """Give the files under ``root`` the mode a plain create gives under the umask (some writers,
    such as safetensors, create theirs 0600). Directories already have it: they were made with
    ``os.mkdir``/``os.makedirs``, and are left alone (a chmod could clear an inherited setgid bit)."""
    file_mode = root.stat().st_mode & 0o666  # root was made with 0o777 & ~umask
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path) and os.stat(path).st_mode & 0o7777 != file_mode:
                os.chmod(path, file_mode)


def _replace(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` (empty, or a checked fisherlora output) is
    moved aside first and deleted once ``tmp`` is in place."""
    if not out.exists() or not any(out.iterdir()):
        os.replace(tmp, out)  # onto an empty directory, too
        return
    old = _new_sibling(out, "old")
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    try:
        shutil.rmtree(old)
    except OSError as exc:
        warnings.warn(f"the new output is in {str(out)!r}, but the previous one could not be removed from "
                      f"{str(old)!r}: {exc}", RuntimeWarning, stacklevel=3)
