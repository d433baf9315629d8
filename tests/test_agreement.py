"""Every rank agrees before it starts (issue 30, docs/DESIGN.md §7): ranks whose weights, heads,
configuration or calibration data differ are refused on every rank alike, before any pass, naming
the ranks and what differs; nothing is written and every model is restored. Spawned gloo ranks,
each run under the deadline of tests/test_distributed.py that fails instead of hanging."""

from __future__ import annotations

import time

import pytest
import torch
from peft import LoraConfig

from fisherlora import FisherLoraConfig, digest, initialize_fisher_lora
from fisherlora.testing import pad_batches, tiny_data
from tests.models import classifier_batches, model_snapshot, tiny_classifier, tiny_llama
from tests.test_distributed import spawn


def _batches(seed: int = 3):
    return list(pad_batches(tiny_data(6, 10, seed=seed), 3))


CFG = dict(rank=4, stats_dtype="float64", backend="torch")


def _statistics(seed: int):
    """Statistics of the tiny Llama over other data per ``seed``, collected in this process alone."""
    from fisherlora.calibration import run_calibration
    from fisherlora.collect import StatisticsCollector
    from fisherlora.layers import find_target_modules

    model = tiny_llama(torch.float64)
    modules = find_target_modules(model, FisherLoraConfig(**CFG).to_lora_config())
    with StatisticsCollector(model, modules, stats_dtype=torch.float64, backend="torch") as col:
        run_calibration(model, _batches(seed=seed))
    stats = col.statistics()
    stats.info.update(model_digest=digest.model_digest(model), head="causal_lm")
    return stats


def _cases(rank: int) -> dict:
    """name -> (model, lora_config, data, fisher_config, keywords) on this rank: one thing differs
    on rank 1."""
    other = rank == 1
    cases = {
        "weights": (tiny_llama(torch.float64, seed=rank), None, _batches(), FisherLoraConfig(**CFG)),
        "head": (tiny_classifier(head_seed=1 + rank), None, classifier_batches(), FisherLoraConfig(**CFG)),
        "data": (tiny_llama(torch.float64), None, _batches(seed=3 + rank), FisherLoraConfig(**CFG)),
        "magnitude": (tiny_llama(torch.float64), None, _batches(),
                      FisherLoraConfig(**CFG, magnitude="unit" if other else "sigma")),
        "rank": (tiny_llama(torch.float64), None, _batches(), FisherLoraConfig(**{**CFG, "rank": 2 if other else 4})),
        "targets": (tiny_llama(torch.float64),
                    LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"] + (["v_proj"] if other else [])),
                    _batches(), FisherLoraConfig(**CFG)),
        "statistics": (tiny_llama(torch.float64), None, None, FisherLoraConfig(**CFG),
                       {"statistics": _statistics(seed=3 + rank)}),
        "loss_fn": (tiny_llama(torch.float64), None, _batches(), FisherLoraConfig(**CFG),
                    {"loss_fn": _summed_logits if other else _summed_squares}),
    }
    return {k: v if len(v) == 5 else (*v, {}) for k, v in cases.items()}


def _summed_logits(out, batch):
    return out.logits.sum()


def _summed_squares(out, batch):
    return out.logits.square().sum()


def _job_disagree(rank, world, tmp):
    out = {}
    for name, (model, lora_config, data, cfg, kw) in _cases(rank).items():
        snap = model_snapshot(model)
        t0 = time.monotonic()
        try:
            res = initialize_fisher_lora(model, lora_config, data, cfg, progress=False, **kw)
            res.save(tmp / name)
            error = None
        except Exception as exc:  # noqa: BLE001
            error = f"{type(exc).__name__}: {exc}"
        try:
            from tests.models import assert_restored

            assert_restored(model, snap)
            restored = True
        except AssertionError:
            restored = False
        out[name] = {"error": error, "restored": restored, "wrapped": hasattr(model, "peft_config"),
                     "written": (tmp / name).exists(), "seconds": time.monotonic() - t0}
    return out


#: what each refusal must name, besides the ranks
NAMED = {
    "weights": ["weights", "model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"],
    "head": ["weights", "1 tensor(s) ['score.weight']"],
    "data": ["calibration data", "6 sequences in 2 batches vs 6 sequences in 2 batches, same sizes but other contents"],
    "magnitude": ["configuration", "fisher.magnitude='sigma' vs 'unit'"],
    "rank": ["configuration", "fisher.rank=4 vs 2"],
    "targets": ["configuration", "lora.target_modules=['q_proj'] vs ['q_proj', 'v_proj']"],
    "statistics": ["reused statistics"],
    "loss_fn": ["head='custom (_summed_squares)' vs 'custom (_summed_logits)'"],
}


def test_ranks_that_differ_are_refused_alike_before_any_pass(tmp_path):
    """Issue 30 §1: different weights, a head drawn on each rank (not a target), other data, another
    magnitude, rank or target list, other reused statistics, another loss_fn: every rank raises the
    same ValueError naming rank 1 and what differs (the tensors; each field with both values; the
    data), nothing written, models restored."""
    ranks = spawn("disagree", 2, tmp_path, module=__name__)
    for case, named in NAMED.items():
        errors = [r[case]["error"] for r in ranks]
        assert errors[0] is not None and errors[0].startswith("ValueError"), (case, errors[0])
        assert errors[0] == errors[1], f"{case}: the ranks raised different errors:\n{errors[0]}\n{errors[1]}"
        assert "rank 1 differs from rank 0" in errors[0], (case, errors[0])
        for what in named:
            assert what in errors[0], (case, what, errors[0])
        for r, got in enumerate(ranks):
            assert got[case]["restored"] and not got[case]["wrapped"], f"{case}: rank {r}'s model was not restored"
            assert not got[case]["written"], case
            assert got[case]["seconds"] < 60, (case, got[case]["seconds"])
    assert "lm_head" not in ranks[0]["head"]["error"] and "model.layers" not in ranks[0]["head"]["error"]


def test_a_digest_sees_one_changed_element_of_any_parameter_or_buffer():
    """Exact: one element of a buffer (the rotary inverse frequencies) or of a head that is not a
    target changes the digest of that tensor alone; a copy of the model gives the same digest."""
    import copy

    a = tiny_classifier(1)
    b = copy.deepcopy(a)
    assert digest.model_digest(a) == digest.model_digest(b)
    with torch.no_grad():
        b.score.weight[0, 0] += 1e-12
        b.model.rotary_emb.inv_freq[1] *= 1.0000001
    diff = digest.differences(digest.model_digest(a), digest.model_digest(b))
    assert diff == ["the values, dtype or shape of 2 tensor(s) ['score.weight', 'model.rotary_emb.inv_freq']"], diff
    c = copy.deepcopy(a).to(torch.float32)  # the dtype counts too
    assert digest.differences(digest.model_digest(a), digest.model_digest(c))


@pytest.mark.parametrize("layout", ["list", "one-shot"])
def test_data_digest_reads_the_whole_set(layout):
    batches = _batches()
    d = digest.data_digest(iter(batches) if layout == "one-shot" else batches)
    assert d["batches"] == 2 and d["sequences"] == 6
    changed = [dict(b) for b in batches]
    changed[1]["input_ids"] = changed[1]["input_ids"].clone()
    changed[1]["input_ids"][-1, -1] += 1
    assert digest.data_digest(changed)["digest"] != d["digest"]
