"""Output directories: every output path checked before any work, written atomically with the
umask's permissions, and an existing directory replaced only when fisherlora wrote it."""

import os
import stat

import pytest

from fisherlora.outdir import atomic_output_dir, check_output_dir
from tests.models import init_llama


@pytest.fixture(scope="module")
def result():
    return init_llama()[1]


def listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_output_directory_is_atomic_and_refuses_to_clobber(tmp_path, monkeypatch, result):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        result.save(out)
    assert (out / "keep.txt").read_text() == "mine"
    # the same directory reached through a parent that does not exist yet ("new/../out")
    with pytest.raises(FileExistsError, match="--overwrite"):
        result.save(tmp_path / "new" / ".." / "out")
    assert (out / "keep.txt").read_text() == "mine" and not (tmp_path / "new").exists()
    # a failure while writing leaves neither a partial output, nor a temporary directory, nor
    # the missing parents it created
    import fisherlora.report as rep

    monkeypatch.setattr(rep, "plot_energy", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    for target in (tmp_path / "new", tmp_path / "a" / "b" / "new"):
        with pytest.raises(OSError, match="disk full"):
            result.save(target)
        assert listing(tmp_path) == ["out", "out/keep.txt"]
    monkeypatch.undo()
    # --overwrite replaces only what fisherlora wrote: not a directory without its marker file
    with pytest.raises(FileExistsError, match="not written by fisherlora"):
        result.save(out, overwrite=True)
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    result.save(out)  # an empty directory is written
    result.save(out, overwrite=True)  # and its fisherlora output replaced
    assert (out / "adapter_model.safetensors").exists() and (out / "fisherlora.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_every_output_path_problem_is_refused_up_front(tmp_path, monkeypatch):
    """Each kind of bad output path is refused by check_output_dir (which the command calls before
    loading anything) and by atomic_output_dir, and nothing is created or changed."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    ours = tmp_path / "ours"
    with atomic_output_dir(ours) as d:
        (d / "fisherlora.json").write_text('{"fisherlora_version": "0"}')
    os.symlink(tmp_path / "gone", tmp_path / "dangling")
    (tmp_path / "file.txt").write_text("x")
    cases = [  # (working directory, output, --overwrite, message)
        (work, tmp_path / "dangling", False, "symbolic link"),
        (work, tmp_path / "dangling" / "sub", True, "symbolic link"),
        (work, tmp_path / "file.txt", True, "is a file"),
        (work, ".", False, "working directory"),
        (work, ".", True, "working directory"),
        (work, "..", True, "working directory"),
        (work, work, True, "working directory"),
        # a fisherlora output: --overwrite may replace it, but not while it is the working directory
        (ours, ".", True, "working directory"),
        (ours / ".." / "ours", ours, True, "working directory"),
    ]
    before = listing(tmp_path)
    for cwd, path, overwrite, message in cases:
        monkeypatch.chdir(cwd)
        with pytest.raises(FileExistsError, match=message):
            check_output_dir(path, overwrite=overwrite)
        with pytest.raises(FileExistsError, match=message):
            with atomic_output_dir(path, overwrite=overwrite):
                raise AssertionError("the block ran")
        assert listing(tmp_path) == before, (path, overwrite)
    assert (work / "notes.txt").read_text() == "mine"


def test_outputs_have_the_umask_permissions_and_overwrite_through_a_link_leaves_nothing(tmp_path, result):
    umask = 0o027  # neither the usual 0o022 nor mkdtemp's 0700
    real = tmp_path / "disk" / "out"
    link = tmp_path / "link"
    os.symlink(real, link, target_is_directory=True)
    old = os.umask(umask)
    try:
        with pytest.raises(FileExistsError, match="symbolic link"):  # to nothing yet
            result.save(link)
        real.mkdir(parents=True)
        result.save(link)  # into the empty directory it points to
        result.save(link, overwrite=True)  # replaced there; the link still points to it
    finally:
        os.umask(old)
    assert link.is_symlink() and os.path.realpath(link) == str(real)
    assert os.listdir(tmp_path / "disk") == ["out"] and sorted(os.listdir(tmp_path)) == ["disk", "link"]
    assert (real / "adapter_model.safetensors").exists()
    for p in [real, *real.rglob("*")]:
        want = (0o777 if p.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(p.stat().st_mode) == want, (p.name, oct(p.stat().st_mode))
