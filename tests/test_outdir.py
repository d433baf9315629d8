"""Output directories: written atomically, never clobbered without --overwrite."""

import pytest

from tests.models import init_llama


def test_output_directory_is_atomic_and_refuses_to_clobber(tmp_path, monkeypatch):
    _, result, _, _ = init_llama()
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
    # a failure while writing leaves neither a partial output nor a temporary directory
    import fisherlora.report as rep

    monkeypatch.setattr(rep, "plot_energy", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        result.save(tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    monkeypatch.undo()
    result.save(out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "adapter_model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
