"""A model sharded with FSDP2 (``fully_shard``: DTensor weights) initialised in place, on gloo with
spawned CPU ranks (docs/DESIGN.md §7): the statistics, selections and adapters against the
unsharded single-process run over the same data, the logits at step 0, the whole weights gathered
one layer at a time, the factors sharded like the base and trained through FSDP2, saving and
loading, uneven shares (a rank without sequences runs lock-step passes), failing together, and
the refusal of tensor-parallel placements.

Every multi-process test runs under a deadline that fails it instead of hanging the suite."""


import pytest
import torch

from fisherlora import FisherLoraConfig, initialize_fisher_lora, load, sharded
from fisherlora.adapter import lora_layers
from fisherlora.layers import find_target_modules, layer_shape
from tests.models import tiny_llama
from tests.test_distributed import _close, _data, _job_fail, _probe, _run, single, spawn  # noqa: F401

#: the memory modes checked at each world size (the packed mode's reduction is the unsharded one's)
MODES = {2: ("full",), 3: ("projected", "few")}


def _shard(model):
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def _logits(model, probe):
    with torch.no_grad():
        return model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits


def _lora_grads(peft_model, probe) -> dict:
    """Gradients of the LoRA factors of a mean-reduced loss on ``probe`` (whole tensors)."""
    for _, lay in lora_layers(peft_model):
        for holder in (lay.lora_A, lay.lora_B):
            holder["default"].weight.requires_grad_(True)
    out = peft_model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"], labels=probe["input_ids"])
    out.loss.backward()
    return {n: sharded.full_state_dict({"g": lay.lora_B["default"].weight.grad})["g"].detach().clone()
            for n, lay in lora_layers(peft_model)}


def _run_sharded(mode: str, batches, fisher_type: str = "empirical") -> dict:
    model = tiny_llama(torch.float64)
    probe = _probe()
    before = _logits(model, probe)
    modules = find_target_modules(model, _lora_config())
    largest = max(layer_shape(m)[0] * layer_shape(m)[1] * 8 for m in modules.values())
    total = sum(layer_shape(m)[0] * layer_shape(m)[1] * 8 for m in modules.values())
    _shard(model)
    sharded.METER.reset()
    cfg = FisherLoraConfig(rank=4, stats_dtype="float64", memory_mode=mode, fisher_type=fisher_type, mc_samples=2)
    res = initialize_fisher_lora(model, data=batches, fisher_config=cfg, progress=False)
    factors_sharded = all(sharded.is_dtensor(lay.lora_B["default"].weight) for _, lay in lora_layers(res.model))
    base_sharded = all(sharded.is_dtensor(lay.get_base_layer().weight) for _, lay in lora_layers(res.model))
    lora = {}
    for n, lay in lora_layers(res.model):  # gathered whole (collectives, the same order on every rank)
        full = sharded.full_state_dict({"B": lay.lora_B["default"].weight, "A": lay.lora_A["default"].weight})
        lora[n] = (full["B"].detach().clone(), full["A"].detach().clone())
    after = _logits(res.model, probe)
    st = res.statistics
    return {"A": {n: st.factors(n)[0] for n in st.layers}, "G": {n: st.factors(n)[1] for n in st.layers},
            "a_count": {n: st.a_count[st.a_key[n]] for n in st.layers}, "g_count": dict(st.g_count),
            "indices": {n: s.indices for n, s in res.selections.items()}, "lora": lora,
            "logit_change": float((after - before).abs().max()), "calibration": st.info["calibration"],
            "gathered_peak": sharded.METER.peak, "largest_layer": largest, "all_targets": total,
            "factors_sharded": factors_sharded, "base_sharded": base_sharded, "result": res}


def _lora_config():
    from fisherlora.heads import default_lora_config, resolve_head

    model = tiny_llama(torch.float64)
    cfg = FisherLoraConfig(rank=4)
    return default_lora_config(cfg, resolve_head(model, None, cfg.fisher_type.value), model)


def _job_sharded(rank, world, tmp):
    # "few": 2 sequences, so at 3 ranks one rank has none and makes lock-step passes only
    out = {mode: _run_sharded("full", _data(world, n=2)) if mode == "few" else _run_sharded(mode, _data(world))
           for mode in MODES[world]}
    res = out[MODES[world][0]].pop("result")
    res.save(tmp / "out")  # the factors gathered on every rank, rank 0 writes
    probe = _probe()
    loaded = load(_shard(tiny_llama(torch.float64)), tmp / "out")
    out["loaded_sharded"] = all(sharded.is_dtensor(lay.lora_B["default"].weight) for _, lay in lora_layers(loaded))
    out["load_diff"] = float((_logits(loaded, probe) - _logits(res.model, probe)).abs().max())
    out["grads"] = _lora_grads(res.model, probe)  # FSDP2 averages the ranks' (identical) gradients
    for v in out.values():
        if isinstance(v, dict):
            v.pop("result", None)
    if world == 3:  # the true Fisher: every rank, even one without sequences, backpropagates each draw
        got = _run_sharded("full", _data(world, n=2), fisher_type="true")
        out["true"] = {"logit_change": got["logit_change"], "finite": all(torch.isfinite(g).all()
                                                                          for g in got["G"].values())}
    if world == 2:
        out["fail"] = _job_fail(rank, world, tmp, _shard(tiny_llama(torch.float64)))
        out["tensor_parallel"] = _job_tensor_parallel(rank, world, tmp)
    return out


def _job_tensor_parallel(rank, world, tmp):
    """A weight split by columns (tensor parallel, ``Shard(1)``) is refused before any pass."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    model = tiny_llama(torch.float32)
    mesh = init_device_mesh("cpu", (world,))
    up = model.model.layers[0].mlp.up_proj
    up.weight = torch.nn.Parameter(distribute_tensor(up.weight.detach(), mesh, [Shard(1)]))
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        initialize_fisher_lora(model, data=_data(world), fisher_config=FisherLoraConfig(rank=4), progress=False)
        return {"error": None}
    except ValueError as exc:
        return {"error": str(exc), "passes": len(calls)}


@pytest.fixture(scope="module")
def grads_single():
    """LoRA gradients on the probe of the unsharded single-process initialisation (world 2's data)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    res = initialize_fisher_lora(tiny_llama(torch.float64), data=_data(2),
                                 fisher_config=FisherLoraConfig(rank=4, stats_dtype="float64"), progress=False)
    yield _lora_grads(res.model, _probe())
    torch.set_num_threads(threads)


@pytest.mark.parametrize("world", [2, 3])
def test_fsdp2_sharded_model_equals_the_unsharded_single_process_run(world, single, grads_single, tmp_path):  # noqa: F811
    """Statistics (float64, 1e-12), counts, indices and adapters of an FSDP2-sharded model on N
    ranks against the unsharded model in one process; logits unchanged at step 0; every whole
    weight gathered one layer at a time; factors sharded like the base, trained through FSDP2,
    saved by rank 0 and loaded onto a sharded base; at 2 ranks a rank that fails and a
    tensor-parallel weight; at 3 a rank without sequences (lock-step passes), also under the true
    Fisher."""
    ranks = spawn("sharded", world, tmp_path, module=__name__)
    ref = single(world)
    for case in MODES[world]:
        want = ref[case]
        for r, got in enumerate(ranks):
            g = got[case]
            where = f"{case} mode, rank {r} of {world}, sharded"
            assert g["calibration"]["sequences"] == want["calibration"]["sequences"], where
            assert g["a_count"] == want["a_count"] and g["g_count"] == want["g_count"], where
            for n in want["G"]:
                _close(g["A"][n], want["A"][n], f"A of {n}, {where}")
                _close(g["G"][n], want["G"][n], f"G of {n}, {where}")
                assert torch.equal(g["indices"][n], want["indices"][n]), f"chosen indices of {n}, {where}"
                for x, y in zip(g["lora"][n], ranks[0][case]["lora"][n]):
                    assert torch.equal(x, y), f"adapter of {n} differs between rank {r} and rank 0 ({case})"
                for x, y in zip(g["lora"][n], want["lora"][n]):
                    torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-9, msg=f"adapter of {n}, {where}")
            assert g["logit_change"] < 1e-10, f"logits changed at step 0: {where}"
            assert g["base_sharded"] and g["factors_sharded"], where
            # never the model whole: its own layer and the one passing through, at most
            assert g["gathered_peak"] <= 2 * g["largest_layer"], (where, g["gathered_peak"], g["largest_layer"])
            assert g["gathered_peak"] < g["all_targets"] / 4, where
    for r, got in enumerate(ranks):
        assert got["load_diff"] < 1e-10 and got["loaded_sharded"], f"fisherlora.load onto a sharded base, rank {r}"
    if world == 2:  # the same data on both ranks and a mean loss: FSDP2's average is the one-process gradient
        for r, got in enumerate(ranks):
            for n, g in grads_single.items():
                torch.testing.assert_close(got["grads"][n], g, rtol=1e-9, atol=1e-12, msg=f"grad of {n}, rank {r}")
        for r, got in enumerate(ranks):
            fail = got["fail"]
            assert fail["error"] is not None and fail["error"].startswith("RankFailedError"), (r, fail["error"])
            assert "rank 1 of 2" in fail["error"] and "a broken batch on this rank" in fail["error"], fail["error"]
            assert fail["restored"] and not fail["wrapped"] and not fail["written"], f"rank {r}"
            assert fail["seconds"] < 60
            tp = got["tensor_parallel"]
            assert tp["error"] and "Shard(dim=1)" in tp["error"] and "tensor-parallel" in tp["error"], tp["error"]
            assert tp["passes"] == 0
    if world == 3:
        for got in ranks:
            assert got["true"]["finite"] and got["true"]["logit_change"] < 1e-10
