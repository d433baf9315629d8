"""fisherlora on torch.distributed (docs/DESIGN.md §7), on gloo with spawned CPU ranks: the
statistics, selections and adapters of N ranks against the single-process run over the same data,
uneven shares, the spread of the decompositions, rank 0's saving, and failing together.

Every multi-process test runs under a deadline that fails it instead of hanging the suite."""

import importlib
import os
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fisherlora import FisherLoraConfig, initialize_fisher_lora, sharded
from fisherlora.adapter import lora_layers
from fisherlora.spread import assign_by_cost, svd_cost
from fisherlora.testing import pad_batches, tiny_data
from tests.models import tiny_llama

DEADLINE_S = 240
#: the memory modes checked at each world size (each once: spawned ranks are slow to start)
MODES = {1: ("full",), 2: ("full", "packed"), 3: ("full", "projected")}


# ----------------------------------------------------------------------------- helpers
def _entry(rank, world, tmp, job, module):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg-{job}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        out = getattr(importlib.import_module(module), f"_job_{job}")(rank, world, Path(tmp))
        torch.save(out, Path(tmp) / f"{job}-{rank}.pt")
    except BaseException:
        (Path(tmp) / f"{job}-{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def spawn(job: str, world: int, tmp: Path, deadline: float = DEADLINE_S, module: str = __name__) -> list[dict]:
    """Run ``<module>._job_<job>`` on ``world`` gloo ranks; fail (killing them) past ``deadline`` seconds."""
    ctx = mp.start_processes(_entry, args=(world, str(tmp), job, module), nprocs=world, join=False,
                             start_method="spawn")
    end = time.monotonic() + deadline
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > end:
                pytest.fail(f"{job} on {world} rank(s) did not finish within {deadline} s")
    except mp.ProcessRaisedException:
        errs = "\n".join(p.read_text() for p in sorted(tmp.glob(f"{job}-*.err")))
        pytest.fail(f"{job} on {world} rank(s) raised:\n{errs}")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [torch.load(tmp / f"{job}-{r}.pt", weights_only=False) for r in range(world)]


def _data(world: int, n: int = 7):
    """``n`` sequences; those of the last rank's share carry no label token (when world > 1)."""
    data = tiny_data(n, 12, seed=3)
    if world > 1:
        for j in range(world - 1, n, world):
            data.labels[j] = [-100] * len(data.labels[j])
    return list(pad_batches(data, 3))


def _probe():
    return next(pad_batches(tiny_data(2, 10, seed=9), 2))


def _run(mode: str, batches) -> dict:
    model = tiny_llama(torch.float64)
    probe = _probe()
    with torch.no_grad():
        before = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    cfg = FisherLoraConfig(rank=4, stats_dtype="float64", memory_mode=mode)
    res = initialize_fisher_lora(model, data=batches, fisher_config=cfg, progress=False)
    with torch.no_grad():
        after = res.model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    layers = {n: (lay.lora_B["default"].weight.detach().clone(), lay.lora_A["default"].weight.detach().clone())
              for n, lay in lora_layers(res.model)}
    st = res.statistics
    return {"A": {n: st.factors(n)[0] for n in st.layers}, "G": {n: st.factors(n)[1] for n in st.layers},
            "a_count": {n: st.a_count[st.a_key[n]] for n in st.layers}, "g_count": dict(st.g_count),
            "indices": {n: s.indices for n, s in res.selections.items()}, "lora": layers,
            "logit_change": float((after - before).abs().max()), "calibration": st.info["calibration"],
            "result": res}


def _job_main(rank, world, tmp):
    out = {mode: _run(mode, _data(world)) for mode in MODES[world]}
    out["few"] = _run("full", _data(world, n=2))  # fewer sequences than ranks at world 3
    res = out["full"].pop("result")
    res.save(tmp / "out")  # rank 0 writes, the others wait
    assert (tmp / "out" / "fisherlora.json").is_file()  # on every rank, once save returned
    from fisherlora import load

    loaded = load(tiny_llama(torch.float64), tmp / "out")
    probe = _probe()
    with torch.no_grad():
        a = loaded(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
        b = res.model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    out["load_diff"] = float((a - b).abs().max())
    for v in out.values():
        if isinstance(v, dict):
            v.pop("result", None)
    if world == 2:  # in the same ranks: spawning new ones costs more than the run
        out["fail"] = _job_fail(rank, world, tmp)
        from fisherlora.distributed import agree_on_plan, context  # memory_mode="auto" chose differently
        mode, groups = agree_on_plan(context(), *(("full", 1) if rank == 0 else ("projected", 2)))
        out["plan"] = (mode.value, groups)
    if world == 3:  # an explicit group of global ranks 0 and 2; rank 1 stays out
        group = dist.new_group([0, 2])
        if rank != 1:
            model = tiny_llama(torch.float64)
            res = initialize_fisher_lora(model, data=_data(2), fisher_config=FisherLoraConfig(rank=4, stats_dtype=
                                         "float64"), progress=False, process_group=group)
            out["subgroup"] = {n: s.indices for n, s in res.selections.items()}
            out["subgroup_G"] = {n: res.statistics.G[n] for n in res.statistics.layers}
    return out


class _FailsOnRank1:
    """Calibration batches whose second batch raises on rank 1 only (bad data on one rank)."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        for i, b in enumerate(self.batches):
            if i == 1 and dist.get_rank() == 1:
                raise ValueError("a broken batch on this rank")
            yield b


def _job_fail(rank, world, tmp, model=None):
    """A rank that raises mid-calibration, on ``model`` (default: a fresh tiny Llama; the FSDP2
    tests pass a sharded one, whose local shards and FSDP2 hooks must come back as they were)."""
    model = tiny_llama(torch.float64) if model is None else model
    before = {k: sharded.local(v).clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
    t0 = time.monotonic()
    try:
        res = initialize_fisher_lora(model, data=_FailsOnRank1(list(pad_batches(tiny_data(12, 10), 1))),
                                     fisher_config=FisherLoraConfig(rank=4, stats_dtype="float64"), progress=False)
        res.save(tmp / "never")
        error = None
    except Exception as exc:  # noqa: BLE001
        error = f"{type(exc).__name__}: {exc}"
    restored = (all(torch.equal(v, sharded.local(model.state_dict()[k])) for k, v in before.items())
                and flags == [p.requires_grad for p in model.parameters()]
                and hooks == [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()])
    return {"error": error, "seconds": time.monotonic() - t0, "restored": restored,
            "written": (tmp / "never").exists(), "wrapped": hasattr(model, "peft_config")}


# ----------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def single():
    """The single-process runs (no process group) over the same data, per world size, on one
    thread as each rank runs; the suite's thread count is put back afterwards (later tests, the
    memory plan's among them, depend on it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    assert not dist.is_initialized()
    cache = {}

    def get(world):
        if world not in cache:
            cache[world] = {**{m: _run(m, _data(world)) for m in MODES[world]}, "few": _run("full", _data(world, n=2))}
        return cache[world]

    yield get
    torch.set_num_threads(threads)


def _close(a, b, what):
    scale = float(b.abs().max()) or 1.0
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12 * scale, msg=what)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_n_ranks_equal_one_process_over_the_same_data(world, single, tmp_path):
    """Statistics (float64, 1e-12), counts, chosen indices and adapters of N ranks against one
    process; adapters bit-identical across ranks; logits unchanged; uneven shares (a rank without
    label tokens; at 3 ranks, one without sequences); rank 0 saves, every rank loads; at 2 ranks
    also a rank that raises mid-calibration."""
    ranks = spawn("main", world, tmp_path)
    ref = single(world)
    for case in (*MODES[world], "few"):
        want = ref[case]
        for r, got in enumerate(ranks):
            g = got[case]
            where = f"{case} mode, rank {r} of {world}"
            assert g["calibration"]["sequences"] == want["calibration"]["sequences"], where
            assert g["calibration"]["label_tokens"] == want["calibration"]["label_tokens"], where
            assert g["a_count"] == want["a_count"] and g["g_count"] == want["g_count"], where
            for n in want["G"]:  # float64 sums over the same tokens, reduced in another order
                _close(g["A"][n], want["A"][n], f"A of {n}, {where}")
                _close(g["G"][n], want["G"][n], f"G of {n}, {where}")
                assert torch.equal(g["indices"][n], want["indices"][n]), f"chosen indices of {n}, {where}"
                for x, y in zip(g["lora"][n], ranks[0][case]["lora"][n]):
                    assert torch.equal(x, y), f"adapter of {n} differs between rank {r} and rank 0 ({case})"
                for x, y in zip(g["lora"][n], want["lora"][n]):
                    torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-9, msg=f"adapter of {n}, {where}")
            assert g["logit_change"] < 1e-10, f"logits changed at step 0: {where}"
        assert ranks[0][case]["calibration"]["sequences"] == (7 if case != "few" else 2)
    for r, got in enumerate(ranks):
        assert got["load_diff"] < 1e-10, f"fisherlora.load on rank {r}"
    if world == 2:
        _check_failed_together(ranks)
        for got in ranks:
            assert got["plan"] == ("projected", 2)  # the leanest plan of the ranks, on every rank
    if world == 3:  # process_group=: the group's own ranks, its own rank numbering
        for got in (ranks[0], ranks[2]):
            for n, idx in single(2)["full"]["indices"].items():
                assert torch.equal(got["subgroup"][n], idx), n
                _close(got["subgroup_G"][n], single(2)["full"]["G"][n], f"G of {n} on a subgroup")


def _check_failed_together(ranks):
    """A rank that raises mid-calibration: every rank stops, names it, restores its model, writes nothing."""
    for r, out in enumerate(ranks):
        got = out["fail"]
        assert got["error"] is not None and got["error"].startswith("RankFailedError"), (r, got["error"])
        assert "rank 1 of 2" in got["error"] and "a broken batch on this rank" in got["error"], got["error"]
        assert "calibration" in got["error"], got["error"]
        assert got["restored"] and not got["wrapped"], f"rank {r}'s model was not restored"
        assert not got["written"]
        assert got["seconds"] < 60, f"rank {r} took {got['seconds']:.0f} s to stop"


def test_decompositions_are_balanced_by_cost():
    shapes = {"q": (64, 64), "k": (16, 64), "v": (16, 64), "o": (64, 64), "up": (128, 64), "down": (64, 128)}
    costs = {n: svd_cost(s) for n, s in shapes.items()}
    assert costs["up"] == 128 * 64 * 64 and costs["k"] == 64 * 16 * 16
    for world in (1, 2, 3, 8):
        owner = assign_by_cost(costs, world)
        assert owner == assign_by_cost(costs, world)  # the same on every rank
        load = [sum(c for n, c in costs.items() if owner[n] == r) for r in range(world)]
        assert max(load) - min(load) <= max(costs.values()), (world, load)
        if world >= 2:  # the two costliest go to different ranks
            assert owner["up"] != owner["down"]


@pytest.mark.slow
def test_torchrun_gives_the_single_process_adapter_on_the_embedded_model(tmp_path):
    """``torchrun --nproc-per-node 2 -m fisherlora init`` on SmolLM2 (8 sequences) writes the
    adapter one process writes (one thread per process in both: the same float32 rounding)."""
    import json
    import subprocess
    import sys

    from safetensors.torch import load_file

    args = ["init", "--num-samples", "8", "--max-length", "96", "--batch-size", "2", "--rank", "4",
            "--target-modules", "q_proj,v_proj,down_proj", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = {"one": [sys.executable, "-m", "fisherlora"],
              "two": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                      "-m", "fisherlora"]}
    for name, cmd in launch.items():
        proc = subprocess.run([*cmd, *args, "--output", str(tmp_path / name)], env=env, capture_output=True,
                              text=True, timeout=1200)
        assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (load_file(tmp_path / n / "adapter_model.safetensors") for n in launch)
    assert one.keys() == two.keys()
    for k in one:
        assert torch.equal(one[k], two[k]), k
    reports = [json.loads((tmp_path / n / "report.json").read_text()) for n in launch]
    assert [[la["indices"] for la in r["layers"]] for r in reports][0] == [la["indices"] for la in reports[1]["layers"]]
    assert reports[0]["calibration"]["label_tokens"] == reports[1]["calibration"]["label_tokens"]
