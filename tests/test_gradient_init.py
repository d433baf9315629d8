"""The gradient starts (fisherlora/gradient_init.py, docs/DESIGN.md §1 step 6) against a float64
reference built from autograd weight gradients and explicit K-FAC factors on a tiny model: the
gradient statistic, the chosen subspace, the scale, unchanged outputs at step 0; PEFT's LoRA-GA
on the same data; refusals before any pass; packed and layer groups; save/load/convert; the
memory plan; N gloo ranks and an FSDP2-sharded model against one process; a quantised base; and
the lowest-energy reading of FILet's score.

Every multi-process test runs under a deadline that fails it instead of hanging the suite."""

import json
import math

import pytest
import torch
from torch import nn

import fisherlora
from fisherlora import FisherLoraConfig, initialize_fisher_lora
from fisherlora.adapter import lora_layers
from fisherlora.calibration import run_calibration
from fisherlora.collect import StatisticsCollector
from fisherlora.gradient_init import RELATIVE_DAMPING, stable_scale
from tests.models import (
    assert_restored,
    model_snapshot,
    pad_batch,
    random_sequences,
    reference_factors,
    target_names,
    tiny_gpt2,
    tiny_llama,
)

R = 3  # rank: 2r = 6 <= 32, the smallest side of the tiny Llama's layers
INITS = ("gradient", "natural_gradient")


# ----------------------------------------------------------------------------- the float64 reference
def _data(n=6, seed=1, vocab=101):
    seqs, labels = random_sequences(n, vocab=vocab, seed=seed, min_len=5, max_len=12, label_drop=0.3)
    return seqs, labels, [pad_batch(seqs[:3], labels[:3]), pad_batch(seqs[3:], labels[3:])]


def reference_weight_gradients(model, names, seqs, labels):
    """Autograd's weight gradients of the SUM of next-token cross-entropies over the label tokens,
    one unpadded sequence at a time, in the ``(d_out, d_in)`` orientation."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.requires_grad_(False)
    weights = {n: model.get_submodule(n).weight for n in names}
    for w in weights.values():
        w.requires_grad_(True)
        w.grad = None
    try:
        for ids, lab in zip(seqs, labels):
            L = len(ids)
            logits = model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, L, dtype=torch.long),
                           position_ids=torch.arange(L)[None]).logits
            loss = nn.functional.cross_entropy(logits[0, :-1], torch.tensor(lab[1:]), ignore_index=-100,
                                               reduction="sum")
            loss.backward()
        return {n: w.grad.detach().clone() for n, w in weights.items()}
    finally:
        for w in weights.values():
            w.grad = None
        for p, f in flags:
            p.requires_grad_(f)


@pytest.fixture(scope="module")
def reference():
    """The tiny float64 Llama's reference: autograd gradients, explicit K-FAC factors, the count."""
    model = tiny_llama(torch.float64)
    seqs, labels, _ = _data()
    names = target_names(model)
    A, G, N = reference_factors(model, names, seqs, labels)
    A, G = ({n: t.detach() for n, t in f.items()} for f in (A, G))
    return {"grad": reference_weight_gradients(model, names, seqs, labels), "A": A, "G": G, "N": N, "names": names}


def _init(init, *, model=None, **cfg):
    model = tiny_llama(torch.float64) if model is None else model
    cfg = FisherLoraConfig(rank=R, alpha=6, backend="torch", stats_dtype="float64", init=init, **cfg)
    return initialize_fisher_lora(model, None, _data()[2], cfg, progress=False)


@pytest.fixture(scope="module")
def results():
    return {init: _init(init) for init in INITS}


def _inv_sqrt(M, lam):
    w, V = torch.linalg.eigh(M)
    return V @ torch.diag((w.clamp_min(0) + lam) ** -0.5) @ V.T


def _expected_directions(ref, name, natural):
    """``(L, R)``: unit left/right directions of the reference's (whitened) gradient, best first."""
    g = ref["grad"][name] / ref["N"]
    if not natural:
        U, _, Vh = torch.linalg.svd(g, full_matrices=False)
        return U, Vh.T
    A, G = ref["A"][name], ref["G"][name]
    Gi = _inv_sqrt(G, RELATIVE_DAMPING * torch.trace(G) / G.shape[0])
    Ai = _inv_sqrt(A, RELATIVE_DAMPING * torch.trace(A) / A.shape[0])
    P, _, Qh = torch.linalg.svd(Gi @ g @ Ai, full_matrices=False)
    return nn.functional.normalize(Gi @ P, dim=0), nn.functional.normalize(Ai @ Qh.T, dim=0)


def _projector(X):
    """Orthogonal projector onto the column space of ``X``."""
    Q, _ = torch.linalg.qr(X)
    return Q @ Q.T


# ----------------------------------------------------------------------------- the statistic
def test_the_gradient_statistic_is_autograds_weight_gradient_of_the_summed_loss(reference):
    """``∇W · N_G`` equals autograd's weight gradient of the summed loss; ``N_G`` the counted tokens;
    A and G are those of a collection without the gradient."""
    model = tiny_llama(torch.float64)
    names = reference["names"]
    modules = {n: model.get_submodule(n) for n in names}
    with StatisticsCollector(model, modules, stats_dtype=torch.float64, backend="torch", gradient=True) as col:
        run_calibration(model, _data()[2])
    st = col.statistics()
    assert list(st.grad) == names
    for n in names:
        assert st.g_count[n] == reference["N"], n
        assert st.grad[n].shape == reference["grad"][n].shape and st.grad[n].dtype == torch.float64
        torch.testing.assert_close(st.grad[n] * st.g_count[n], reference["grad"][n], rtol=1e-9, atol=1e-12, msg=n)
        torch.testing.assert_close(st.factors(n)[0], reference["A"][n], rtol=1e-9, atol=1e-12, msg=n)
        torch.testing.assert_close(st.G[n], reference["G"][n], rtol=1e-9, atol=1e-12, msg=n)


def test_the_gradient_statistic_agrees_on_every_available_backend(reference):
    """float32 statistics of a float32 model through each op backend (the compiled one included)
    against the float64 reference."""
    from fisherlora.ops import available_backends

    names = reference["names"]
    for backend in available_backends("cpu"):
        model = tiny_llama(torch.float32)
        modules = {n: model.get_submodule(n) for n in names}
        with StatisticsCollector(model, modules, backend=backend, gradient=True) as col:
            run_calibration(model, _data()[2])
        st = col.statistics()
        for n in names:
            want = reference["grad"][n] / reference["N"]
            torch.testing.assert_close(st.grad[n].double(), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()),
                                       msg=f"{n} on {backend}")


def test_the_gradient_of_a_conv1d_layer_is_in_the_weight_view_orientation():
    """GPT-2's Conv1D stores ``(d_in, d_out)``; the statistic is ``(d_out, d_in)`` (``weight_view``)."""
    from fisherlora.losses import token_loss_sum

    model = tiny_gpt2(torch.float64)
    seqs, labels = random_sequences(4, vocab=97, seed=2, min_len=4, max_len=9)
    batch = pad_batch(seqs, labels)
    names = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    modules = {n: model.get_submodule(n) for n in names}
    with StatisticsCollector(model, modules, stats_dtype=torch.float64, backend="torch", gradient=True) as col:
        run_calibration(model, [batch])
    st = col.statistics()
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.requires_grad_(False)
    for m in modules.values():
        m.weight.requires_grad_(True)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    token_loss_sum(logits, batch["labels"].masked_fill(batch["attention_mask"] == 0, -100))[0].backward()
    for n, m in modules.items():
        torch.testing.assert_close(st.grad[n] * st.g_count[n], m.weight.grad.T, rtol=1e-9, atol=1e-12, msg=n)
    for p, f in flags:
        p.requires_grad_(f)


# ----------------------------------------------------------------------------- subspace, scale, outputs
@pytest.mark.parametrize("init", INITS)
def test_the_adapter_spans_the_reference_subspace_at_the_stated_scale(init, reference, results):
    """A's rows span the first r right directions, B's columns the next r left directions of the
    reference's gradient (natural: whitened by the damped K-FAC factors and mapped back), each row
    of A and column of B of norm ζ = d_out^{1/4}/4, each one ± the reference's direction."""
    for name, layer in lora_layers(results[init].model):
        L, Rt = _expected_directions(reference, name, init == "natural_gradient")
        A = layer.lora_A["default"].weight.detach().double()
        B = layer.lora_B["default"].weight.detach().double()
        zeta = stable_scale(B.shape[0])
        assert math.isclose(zeta, B.shape[0] ** 0.25 / 4)
        torch.testing.assert_close(A.norm(dim=1), torch.full((R,), zeta, dtype=torch.float64), rtol=1e-6, atol=0)
        torch.testing.assert_close(B.norm(dim=0), torch.full((R,), zeta, dtype=torch.float64), rtol=1e-6, atol=0)
        cos_a = (A / zeta) @ Rt[:, :R]
        cos_b = (B / zeta).T @ L[:, R:2 * R]
        torch.testing.assert_close(cos_a.diagonal().abs(), torch.ones(R, dtype=torch.float64), rtol=0, atol=1e-5,
                                   msg=f"{name}: A's rows against the reference's right directions 1..r")
        torch.testing.assert_close(cos_b.diagonal().abs(), torch.ones(R, dtype=torch.float64), rtol=0, atol=1e-5,
                                   msg=f"{name}: B's columns against the reference's left directions r+1..2r")
        torch.testing.assert_close(_projector(A.T), _projector(Rt[:, :R]), rtol=0, atol=1e-5)
        torch.testing.assert_close(_projector(B), _projector(L[:, R:2 * R]), rtol=0, atol=1e-5)


def test_the_natural_gradient_subspace_is_the_fisher_optimal_one(reference, results):
    """The rank-r part the adapter holds is the Fisher-norm optimum: among rank-r matrices with A's
    row space, ``‖G_λ^{1/2}(N − X)A_λ^{1/2}‖`` is smallest for the reference's whitened top-r, and
    the plain gradient's subspace is a different one (the test would not tell them apart otherwise)."""
    differ = 0
    for name, layer in lora_layers(results["natural_gradient"].model):
        _, Rt = _expected_directions(reference, name, True)
        _, Rg = _expected_directions(reference, name, False)
        A = layer.lora_A["default"].weight.detach().double()
        torch.testing.assert_close(_projector(A.T), _projector(Rt[:, :R]), rtol=0, atol=1e-5)
        differ += float((_projector(Rt[:, :R]) - _projector(Rg[:, :R])).abs().max()) > 1e-2
    assert differ == len(reference["names"])


@pytest.mark.parametrize("init", INITS)
def test_outputs_are_unchanged_at_step_0(init, results):
    from tests.models import probe

    ids = probe()
    with torch.no_grad():
        before = tiny_llama(torch.float64)(input_ids=ids).logits
        after = results[init].model(input_ids=ids).logits
    assert float((after - before).abs().max()) < 1e-10
    for _, layer in lora_layers(results[init].model):  # the adapter is not zero: the residual holds s·BA
        assert float(layer.lora_B["default"].weight.detach().abs().max()) > 0.1


@pytest.mark.parametrize("init", INITS)
def test_packed_statistics_and_two_layer_groups_give_the_same_adapter(init, results):
    for kw in (dict(memory_mode="packed"), dict(layer_groups=2)):
        other = _init(init, **kw)
        for (n, a), (_, b) in zip(lora_layers(results[init].model), lora_layers(other.model)):
            for key in ("lora_A", "lora_B"):
                torch.testing.assert_close(getattr(a, key)["default"].weight, getattr(b, key)["default"].weight,
                                           rtol=1e-8, atol=1e-10, msg=f"{n} {key} with {kw}")


def test_the_gradient_start_matches_peft_lora_ga_subspace_on_one_batch():
    """PEFT 0.21.2's ``lora_ga`` (ArB2r) on the same single batch: its A rows span the same right
    directions and its B columns the same left ones (its gradient is of the MEAN loss and its SVD
    randomised; neither changes the exact subspace); its scale differs (docs/DESIGN.md §1 step 6).
    Rank 2: the second layer's gradients on 3 sequences have rank 5, and directions past a
    gradient's rank are an arbitrary completion (warned)."""
    import peft
    from peft import LoraConfig
    from peft.tuners.lora.config import LoraGAConfig
    from peft.tuners.lora.loraga import preprocess_loraga

    R = 2
    seqs, labels = random_sequences(3, vocab=101, seed=1, min_len=5, max_len=12)
    batch = pad_batch(seqs, labels)
    targets = ["q_proj", "o_proj", "down_proj"]
    ours = initialize_fisher_lora(tiny_llama(torch.float64), FisherLoraConfig(rank=R, alpha=6).to_lora_config(
        target_modules=targets), [batch], FisherLoraConfig(rank=R, alpha=6, init="gradient", stats_dtype="float64",
                                                          backend="torch"), progress=False).model
    model = tiny_llama(torch.float32)
    cfg = LoraConfig(r=R, lora_alpha=6, target_modules=targets, init_lora_weights="lora_ga",
                     lora_ga_config=LoraGAConfig())

    def train_step():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    labels=batch["labels"], use_cache=False)
        out.loss.backward()

    torch.manual_seed(0)
    preprocess_loraga(model, cfg, train_step)
    theirs = peft.get_peft_model(model, cfg)
    for (n, a), (_, b) in zip(lora_layers(ours), lora_layers(theirs)):
        A1, A2 = (x.lora_A["default"].weight.detach().double() for x in (a, b))
        B1, B2 = (x.lora_B["default"].weight.detach().double() for x in (a, b))
        torch.testing.assert_close(_projector(A1.T), _projector(A2.T), rtol=0, atol=2e-3, msg=f"{n}: A's row space")
        torch.testing.assert_close(_projector(B1), _projector(B2), rtol=0, atol=2e-3, msg=f"{n}: B's column space")


# ----------------------------------------------------------------------------- refusals, up front
@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("setting, match", [
    (dict(memory_mode="projected"), "memory_mode='full', 'packed' or 'auto'"),
    (dict(fisher_type="true"), "fisher_type='empirical'"),
    (dict(rank_allocation="global"), "rank_allocation='uniform'"),
])
def test_settings_a_gradient_start_cannot_serve_are_refused_by_the_config(init, setting, match):
    with pytest.raises(ValueError, match=match):
        FisherLoraConfig(init=init, **setting)


def test_a_rank_above_half_a_layer_is_refused_before_any_pass_leaving_the_model():
    model = tiny_llama(torch.float64)
    snap = model_snapshot(model)
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    hooks = model_snapshot(model)[4]
    with pytest.raises(ValueError, match=r"2·rank <= min\(d_out, d_in\)"):
        initialize_fisher_lora(model, None, _data()[2], FisherLoraConfig(rank=9, init="natural_gradient"),
                               progress=False)
    assert not calls
    assert_restored(model, (*snap[:4], hooks))


def test_statistics_without_the_gradient_are_refused_for_a_gradient_start(results):
    filet = _init("filet")
    with pytest.raises(ValueError, match="needs the weight gradient"):
        initialize_fisher_lora(tiny_llama(torch.float64), None, None, FisherLoraConfig(rank=R, init="gradient"),
                               statistics=filet.statistics, progress=False)


# ----------------------------------------------------------------------------- save, load, convert
def test_save_load_convert_round_trip(results, tmp_path):
    from peft import PeftModel

    from fisherlora.statistics import FisherStatistics
    from tests.models import probe

    res = results["natural_gradient"]
    out = res.save(tmp_path / "out", save_statistics=True)
    st = FisherStatistics.load(out / "statistics.safetensors")
    assert list(st.grad) == list(res.statistics.grad)
    for n in st.grad:
        assert torch.equal(st.grad[n], res.statistics.grad[n]), n
    again = initialize_fisher_lora(tiny_llama(torch.float64), None, None, res.config, statistics=st, progress=False)
    for (n, a), (_, b) in zip(lora_layers(res.model), lora_layers(again.model)):
        assert torch.equal(a.lora_A["default"].weight, b.lora_A["default"].weight), n
        assert torch.equal(a.lora_B["default"].weight, b.lora_B["default"].weight), n
    loaded = fisherlora.load(tiny_llama(torch.float64), out, is_trainable=True)
    ids = probe()
    with torch.no_grad():
        assert float((loaded(input_ids=ids).logits - res.model(input_ids=ids).logits).abs().max()) < 1e-12
        for n, p in loaded.named_parameters():
            if "lora_" in n:
                p.add_(0.01 * torch.randn_like(p))
    loaded.save_pretrained(tmp_path / "plain", path_initial_model_for_weight_conversion=str(out))
    plain = PeftModel.from_pretrained(tiny_llama(torch.float64), str(tmp_path / "plain"))
    with torch.no_grad():
        diff = (plain(input_ids=ids).logits - loaded(input_ids=ids).logits).abs().max()
    assert float(diff) < 1e-9, "the converted plain LoRA on the original base computes the trained model"


# ----------------------------------------------------------------------------- the memory plan
def test_the_plan_counts_the_gradient_and_offers_no_projected_mode():
    from fisherlora.layers import find_target_modules, layer_shape
    from fisherlora.plan import plan_memory, resolve_memory_mode

    model = tiny_llama(torch.float32)
    lc = FisherLoraConfig(rank=R).to_lora_config()
    shapes = [layer_shape(m) for m in find_target_modules(model, lc).values()]
    plain = {(p.label, p.layer_groups): p for p in plan_memory(model, lc, batch_size=2, max_length=16)}
    grad = {(p.label, p.layer_groups): p for p in plan_memory(model, lc, batch_size=2, max_length=16, gradient=True)}
    assert not [k for k in grad if k[0] == "projected"]
    extra = sum(o * i for o, i in shapes) * 4
    for key in (("full", 1), ("packed", 1)):
        assert grad[key].statistics - plain[key].statistics == extra, key
        assert grad[key].phases["calibration"] >= plain[key].phases["calibration"] + extra
    cfg = FisherLoraConfig(rank=R, init="natural_gradient", memory_mode="auto")
    mode, _ = resolve_memory_mode(model, lc, cfg)
    assert mode.value in ("full", "packed")


def test_the_plan_bounds_the_measured_peak_of_a_natural_gradient_start():
    """SmolLM2's widths (2 layers, all seven projections), packed: the plan's total minus the
    weights against the peak ``initialize_fisher_lora`` allocates (as in tests/test_plan.py),
    within 15 % from above (measured 1.10x on 2026-12-07)."""
    from peft import LoraConfig

    from fisherlora.plan import plan_memory
    from fisherlora.testing import peak_memory, random_llama
    from tests.test_plan import ALL_LINEAR, _padded_batches

    model = random_llama(vocab=2048, hidden=576, intermediate=1536, heads=9, kv_heads=3)
    lc = LoraConfig(r=4, lora_alpha=8, target_modules=ALL_LINEAR)
    cfg = FisherLoraConfig(rank=4, alpha=8, memory_mode="packed", batch_size=2, max_length=32, init="natural_gradient")
    plan = next(p for p in plan_memory(model, lc, batch_size=2, max_length=32, gradient=True)
                if p.label == "packed" and p.layer_groups == 1)
    data = _padded_batches(2048, 2, 32)
    measured, _ = peak_memory(lambda: initialize_fisher_lora(model, lc, data, cfg, progress=False), torch.device("cpu"))
    planned = plan.total - plan.weights
    assert measured <= planned <= 1.15 * measured, f"planned {planned / 2**20:.2f} MiB, measured {measured / 2**20:.2f}"


def test_the_init_flag_is_generated_from_the_config():
    import argparse

    from fisherlora.flags import PLAN_FIELDS, add_config_flags, config_from_args

    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    cfg = config_from_args(parser.parse_args(["--init", "natural_gradient", "--score", "fisher_low"]))
    assert cfg.init.value == "natural_gradient" and cfg.score.value == "fisher_low"
    with pytest.raises(SystemExit):
        parser.parse_args(["--init", "nope"])
    assert "init" in PLAN_FIELDS


# ----------------------------------------------------------------------------- the lowest-energy reading
def test_fisher_low_picks_the_r_smallest_energies():
    from fisherlora.decompose import decompose_layer

    g = torch.Generator().manual_seed(0)
    W = torch.randn(12, 9, generator=g, dtype=torch.float64)
    X, Y = torch.randn(40, 9, generator=g, dtype=torch.float64), torch.randn(40, 12, generator=g, dtype=torch.float64)
    A, G = X.T @ X / 40, Y.T @ Y / 40
    sel, _, _ = decompose_layer("w", W, A, G, rank=3, scaling=1.0, score="fisher_low", magnitude="sigma")
    want = torch.argsort(sel.energy)[:3]
    assert torch.equal(sel.indices, want)
    assert torch.equal(sel.score, sel.energy)
    top, _, _ = decompose_layer("w", W, A, G, rank=3, scaling=1.0, score="fisher", magnitude="sigma")
    assert not set(top.indices.tolist()) & set(sel.indices.tolist())


# ----------------------------------------------------------------------------- N ranks, FSDP2
def _dist_run(init, mode, world, shard=False):
    from tests.test_distributed import _data as dist_data
    from tests.test_distributed import _probe

    model = tiny_llama(torch.float64)
    probe = _probe()
    with torch.no_grad():
        before = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    if shard:
        from tests.test_fsdp import _shard

        _shard(model)
    cfg = FisherLoraConfig(rank=R, stats_dtype="float64", memory_mode=mode, init=init)
    res = initialize_fisher_lora(model, data=dist_data(world), fisher_config=cfg, progress=False)
    with torch.no_grad():
        after = res.model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    lora = {}
    for n, lay in lora_layers(res.model):
        if shard:
            from fisherlora import sharded

            full = sharded.full_state_dict({"B": lay.lora_B["default"].weight, "A": lay.lora_A["default"].weight})
            lora[n] = (full["B"].detach().clone(), full["A"].detach().clone())
        else:
            lora[n] = (lay.lora_B["default"].weight.detach().clone(), lay.lora_A["default"].weight.detach().clone())
    return {"grad": dict(res.statistics.grad), "g_count": dict(res.statistics.g_count), "lora": lora,
            "logit_change": float((after - before).abs().max())}


CASES = (("gradient", "full"), ("natural_gradient", "packed"))


def _job_grad(rank, world, tmp):
    out = {c: _dist_run(*c, world) for c in CASES}
    out["fsdp"] = _dist_run("natural_gradient", "full", world, shard=True)
    return out


def test_two_ranks_and_an_fsdp2_sharded_model_equal_one_process(tmp_path):
    """The weight gradients (float64, 1e-12), counts and adapters of 2 gloo ranks, plain and
    FSDP2-sharded, against the single-process run over the same data; adapters bit-identical
    across ranks; logits unchanged at step 0."""
    from tests.test_distributed import _close, spawn

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = {c: _dist_run(*c, 2) for c in CASES}
    finally:
        torch.set_num_threads(threads)
    single["fsdp"] = single[("natural_gradient", "packed")]
    ranks = spawn("grad", 2, tmp_path, module=__name__)
    for case, want in single.items():
        for r, got in enumerate(ranks):
            g = got[case]
            where = f"{case}, rank {r} of 2"
            assert g["g_count"] == want["g_count"], where
            for n in want["grad"]:
                _close(g["grad"][n], want["grad"][n], f"weight gradient of {n}, {where}")
                for x, y in zip(g["lora"][n], ranks[0][case]["lora"][n]):
                    assert torch.equal(x, y), f"adapter of {n} differs between rank {r} and rank 0 ({case})"
                for x, y in zip(g["lora"][n], want["lora"][n]):
                    torch.testing.assert_close(x, y, rtol=1e-7, atol=1e-9, msg=f"adapter of {n}, {where}")
            assert g["logit_change"] < 1e-10, where


# ----------------------------------------------------------------------------- a quantised base
def test_a_gradient_start_on_a_4bit_base_is_that_of_the_dequantised_model(tmp_path):
    """NF4 (bitsandbytes on the CPU): the statistics go through the quantised layers, the adapter
    is the one :func:`compute_initialization` gives the dequantised float32 model with them, and
    the requantisation error is reported."""
    pytest.importorskip("bitsandbytes")
    from fisherlora import quant
    from fisherlora.decompose import compute_initialization
    from fisherlora.layers import find_target_modules
    from fisherlora.testing import random_llama
    from tests.test_quant import _batches, _load, _quantised

    folder = tmp_path / "fp"
    random_llama(hidden=64, intermediate=128).save_pretrained(folder)
    model = _load(folder, "nf4")
    deq = {n: quant.dequantise(m) for n, m in _quantised(model).items()}
    cfg = FisherLoraConfig(rank=4, alpha=8, backend="torch", init="natural_gradient")
    res = initialize_fisher_lora(model, None, _batches(), cfg, progress=False)
    assert "quantisation" in res.extra
    plain = random_llama(hidden=64, intermediate=128)
    with torch.no_grad():
        for name, W in deq.items():
            plain.get_submodule(name).weight.copy_(W)
    lc = cfg.to_lora_config()
    inits, _ = compute_initialization(find_target_modules(plain, lc), res.statistics, lc, cfg, progress=False)
    assert set(res.statistics.grad) == set(inits)
    for name, layer in lora_layers(res.model):
        assert torch.isfinite(res.statistics.grad[name]).all()
        torch.testing.assert_close(layer.lora_B["default"].weight, inits[name].B, rtol=0, atol=0)
        torch.testing.assert_close(layer.lora_A["default"].weight, inits[name].A, rtol=0, atol=0)


# ----------------------------------------------------------------------------- the command
def test_the_init_command_takes_a_gradient_start_and_records_it(tmp_path):
    from fisherlora import cli
    from tests.models import probe, save_tiny_model
    from tests.test_commands import PAIRS, base, init_cmd

    folder = save_tiny_model(tmp_path / "model")
    assert cli.main(init_cmd(tmp_path, folder, PAIRS, "--init", "natural_gradient", "--save-statistics")) == 0
    out = tmp_path / "out"
    meta = json.loads((out / "fisherlora.json").read_text())
    assert meta["config"]["init"] == "natural_gradient"
    from fisherlora.statistics import FisherStatistics

    assert FisherStatistics.load(out / "statistics.safetensors").grad
    report = (out / "report.md").read_text()
    assert "**init=natural_gradient**" in report and "PiSSA columns do not apply" in report
    ids = probe()
    with torch.no_grad():
        before = base(folder)(input_ids=ids).logits
        after = fisherlora.load(base(folder), out)(input_ids=ids).logits
    assert float((after - before).abs().max()) < 1e-4 * float(before.abs().max())
