"""bench/agreement.py runs end to end at toy size (seconds)."""

import json

from bench import agreement


def test_agreement_benchmark_runs_at_toy_size(tmp_path):
    out = agreement.main(["--quick", "--repeats", "1", "--output", str(tmp_path / "agreement.json")])
    assert json.loads((tmp_path / "agreement.json").read_text()) == out
    assert out["tensors"] > 0 and out["model_bytes"] > 0 and out["data_bytes"] == 8 * 32 * 8 * 3
    assert out["total_s"] >= out["model_digest_s"] > 0 and out["payload_bytes_per_rank"] > 0
