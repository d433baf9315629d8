"""The statistics store: its safetensors file round-trips exactly."""

import pytest
import torch

from fisherlora.statistics import FisherStatistics
from tests.models import collect, pad_batch, target_names


def test_statistics_cache_round_trips_exactly(llama, data, tmp_path):
    seqs, labels = data
    names = target_names(llama)
    st = collect(llama, names, [pad_batch(seqs, labels)])
    st.info["note"] = "x"
    st.save(tmp_path / "s.safetensors")
    back = FisherStatistics.load(tmp_path / "s.safetensors")
    assert back.a_key == st.a_key and back.a_count == st.a_count and back.g_count == st.g_count
    assert back.shapes == st.shapes and back.info == st.info
    for name in names:
        for a, b in zip(st.factors(name), back.factors(name)):
            assert torch.equal(a, b)
    (tmp_path / "other.safetensors").write_bytes(b"")
    with pytest.raises(Exception):  # noqa: B017 (safetensors' own header error)
        FisherStatistics.load(tmp_path / "other.safetensors")


def test_merged_layer_groups_keep_every_layers_fingerprint_through_a_file(tmp_path):
    from tests.models import run_mode

    result = run_mode("full", groups=3)
    stats = result.statistics
    assert set(stats.fingerprints) == set(stats.G) == set(result.selections)
    stats.save(tmp_path / "s.safetensors")
    back = FisherStatistics.load(tmp_path / "s.safetensors")
    assert back.fingerprints == stats.fingerprints and back.kind is stats.kind
    assert "weight_fingerprints" not in back.info
