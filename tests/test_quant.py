"""Quantised bases (fisherlora/quant.py, docs/DESIGN.md §8): bitsandbytes 4-bit and 8-bit layers on
the CPU, statistics through them, the residual requantised, its error, load, and refusals by kind."""

import copy

import pytest
import torch
from torch import nn

import fisherlora
from fisherlora import FisherLoraConfig, quant
from fisherlora.testing import random_llama

bnb = pytest.importorskip("bitsandbytes")

CFG = FisherLoraConfig(rank=4, alpha=8, backend="torch")
#: every kind bitsandbytes' CPU backend runs (README, docs/DESIGN.md §8)
KINDS = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "nf4 double-quant bf16-storage": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True, bnb_4bit_quant_storage=torch.bfloat16),
    "fp4 double-quant fp32-storage": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4",
                                          bnb_4bit_use_double_quant=True, bnb_4bit_quant_storage=torch.float32),
    "fp4 fp16-storage": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_quant_storage=torch.float16),
    "int8": dict(load_in_8bit=True),
}


def _no_cpu_repack(model):
    """bitsandbytes repacks a Linear4bit for CPU inference on a no-grad eval forward (lossy, quant.py):
    the tests' own reference forwards must not do that."""
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    return model


def _load(folder, kind, dtype=torch.float32):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cfg = BitsAndBytesConfig(**KINDS[kind], bnb_4bit_compute_dtype=dtype)
    return _no_cpu_repack(AutoModelForCausalLM.from_pretrained(folder, quantization_config=cfg, device_map="cpu",
                                                               dtype=dtype))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny float32 Llama (d = 64, 128: whole 4-bit blocks) saved to a folder, and the model."""
    folder = tmp_path_factory.mktemp("fp")
    model = random_llama(hidden=64, intermediate=128)
    model.save_pretrained(folder)
    return folder, model


def _batches():
    from fisherlora.testing import pad_batches, tiny_data

    return list(pad_batches(tiny_data(8, 12, seed=3), 4))


def _quantised(model):
    return {n: m for n, m in model.named_modules() if quant.is_quantised(m)}


def _bits(model):
    return {n: [t.clone() for t in quant.storage(m)] for n, m in _quantised(model).items()}


def _same_bits(a, b):
    return list(a) == list(b) and all(all(torch.equal(x, y) for x, y in zip(a[k], b[k], strict=True)) for k in a)


def _state(model):
    """The state dict bit for bit (packed 4-bit data stored in a float dtype may hold NaN patterns)."""
    return {k: (v.view(torch.uint8) if v.dim() else v).clone() for k, v in model.state_dict().items()}


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


# ----------------------------------------------------------------------------- the layer primitives
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_dequantise_requantise_and_the_error_estimate_on_every_cpu_kind(saved, kind):
    folder, fp = saved
    model = _load(folder, kind)
    layers = _quantised(model)
    assert len(layers) == 14, "every projection of both decoder layers is a supported quantised target"
    name = "model.layers.1.mlp.down_proj"
    W_fp = fp.get_submodule(name).weight.detach()
    layer = layers[name]
    D = quant.dequantise(layer)
    assert D.dtype == torch.float32 and D.shape == W_fp.shape and torch.isfinite(D).all()
    true = float((D - W_fp).norm() / D.norm())
    assert 0.75 * true <= quant.quantisation_error(layer) <= 1.3 * true, "the estimate from the quantised weight"
    before = _bits(model)[name]
    quant.requantise_(layer, D)  # what is already on the grid stays there
    assert torch.allclose(quant.dequantise(layer), D, rtol=0, atol=1e-3 * float(D.abs().max()))
    quant.requantise_(layer, D - 0.3 * D.std() * torch.randn_like(D))
    assert not all(torch.equal(x, y) for x, y in zip(before, quant.storage(layer)))
    quant.requantise_(layer, D)
    quant.requantise_(layer, D)
    again = [t.clone() for t in quant.storage(layer)]
    quant.requantise_(layer, D)
    assert all(torch.equal(x, y) for x, y in zip(again, quant.storage(layer))), "deterministic"


@pytest.mark.parametrize("shape", [(7, 33), (3, 100)])
def test_a_weight_that_is_not_whole_blocks(shape):
    """The last 4-bit block is partial when d_out·d_in is not a multiple of the block size."""
    W = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    layer = bnb.nn.Linear4bit(shape[1], shape[0], bias=False, compress_statistics=True, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(W.clone(), requires_grad=False, compress_statistics=True,
                                     quant_type="nf4").to("cpu")
    D = quant.dequantise(layer)
    true = float((D - W).norm() / D.norm())
    assert D.shape == shape and 0.7 * true <= quant.quantisation_error(layer) <= 1.3 * true
    quant.requantise_(layer, D + 0.05)
    assert quant.requantisation_error(layer, D + 0.05, float(D.norm())) < 1.5 * true


def _elementwise_bound(layer, W_res):
    """The largest error rounding ``W_res`` with the layer's quantiser can make, entry by entry:
    half the widest rounding cell times the block's absmax (4-bit), half a step of the row (8-bit),
    plus float16/bfloat16 rounding of the input and of the scales."""
    if quant.settings(layer)["bits"] == 8:
        return W_res.abs().amax(1, keepdim=True) / 127 * 0.5 * (1 + 1e-2) + W_res.abs() * 2 ** -10
    qs = layer.weight.quant_state
    code = qs.code.double().sort().values
    half = float(torch.cat([(code[1:] - code[:-1]) / 2, (1 - code[-1:]), (code[:1] + 1)]).max())
    blocks = W_res.reshape(-1, qs.blocksize)
    return (blocks.abs().amax(1, keepdim=True) * half * (1 + 1e-2)).expand_as(blocks).reshape(W_res.shape) \
        + W_res.abs() * 2 ** -7


# ----------------------------------------------------------------------------- item 1: init on a quantised base
IDS = torch.randint(1, 100, (2, 9), generator=torch.Generator().manual_seed(5))


def _initialise(folder, kind):
    """``(result, dequantised weights before, logits before)`` of an init on a freshly loaded base."""
    model = _load(folder, kind)
    deq = {n: quant.dequantise(m) for n, m in _quantised(model).items()}
    before = _logits(model, IDS)
    return fisherlora.initialize_fisher_lora(model, None, _batches(), CFG, progress=False), deq, before


@pytest.fixture(scope="module")
def nf4_init(saved, tmp_path_factory):
    """The init on the NF4 double-quantised, bf16-stored base, saved: shared by the tests below."""
    result, deq, before = _initialise(saved[0], NF4)
    return result, deq, before, result.save(tmp_path_factory.mktemp("init") / "out")


NF4 = "nf4 double-quant bf16-storage"


@pytest.mark.parametrize("kind", [NF4, "fp4 fp16-storage", "int8"])
def test_init_on_a_quantised_base_requantises_the_residual_within_the_quantiser_bound(saved, nf4_init, kind):
    from fisherlora.adapter import lora_layers

    folder, fp = saved
    result, deq, before = nf4_init[:3] if kind == NF4 else _initialise(folder, kind)
    report = result.report()["quantisation"]
    assert "changed" in report["step0_outputs"]
    for name, layer in lora_layers(result.model):
        base = layer.get_base_layer()
        assert quant.is_quantised(base), f"{name} is still quantised after init"
        B, A = layer.lora_B["default"].weight.detach(), layer.lora_A["default"].weight.detach()
        s = layer.scaling["default"]
        R = quant.dequantise(base)
        assert torch.isfinite(R).all() and R.abs().amax() > 0, f"{name}: an all-zero or NaN residual"
        assert torch.isfinite(B).all() and B.abs().amax() > 0 and A.abs().amax() > 0, name
        W_res = deq[name] - s * (B @ A)
        err = (R - W_res).abs()
        assert (err <= _elementwise_bound(base, W_res)).all(), f"{name}: beyond the quantiser's rounding bound"
        measured = float((R + s * (B @ A) - deq[name]).norm() / deq[name].norm())
        entry = report["layers"][name]
        assert entry["requant_error"] == pytest.approx(measured, rel=1e-3, abs=1e-7)
        # the quantiser's relative error on W_res is that on the float weight W (same kind of matrix)
        W_fp = fp.get_submodule(name).weight.detach()
        q_fp = float((deq[name] - W_fp).norm() / W_fp.norm())
        assert measured * float(deq[name].norm() / W_res.norm()) <= 1.6 * q_fp
        assert entry["quant_error"] == pytest.approx(q_fp, rel=0.3)
    change = float((_logits(result.model, IDS) - before).norm() / before.norm())
    assert 0 < change < 1, "outputs at step 0 change (no longer exactly zero), and boundedly"


def test_the_chosen_directions_are_those_of_the_dequantised_float32_model(nf4_init):
    from fisherlora.adapter import lora_layers
    from fisherlora.decompose import compute_initialization
    from fisherlora.layers import find_target_modules

    result, deq = nf4_init[:2]
    plain = random_llama(hidden=64, intermediate=128)
    with torch.no_grad():
        for name, W in deq.items():
            plain.get_submodule(name).weight.copy_(W)
    lora_config = CFG.to_lora_config()
    inits, sels = compute_initialization(find_target_modules(plain, lora_config), result.statistics,
                                         lora_config, CFG, progress=False)
    for name, layer in lora_layers(result.model):
        assert torch.equal(sels[name].indices, result.selections[name].indices), name
        torch.testing.assert_close(layer.lora_B["default"].weight, inits[name].B, rtol=0, atol=0)
        torch.testing.assert_close(layer.lora_A["default"].weight, inits[name].A, rtol=0, atol=0)


def test_a_failure_while_writing_puts_the_quantised_weights_back_bit_for_bit(saved, monkeypatch):
    folder, _ = saved
    model = _load(folder, "int8")
    bits = _bits(model)
    types = {n: type(m) for n, m in model.named_modules()}
    calls = []
    real = quant.requantise_

    def third_fails(module, W):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        real(module, W)

    monkeypatch.setattr(quant, "requantise_", third_fails)
    with pytest.raises(RuntimeError, match="disk full"):
        fisherlora.initialize_fisher_lora(model, None, _batches()[:1], CFG, progress=False)
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert _same_bits(bits, _bits(model))


# ----------------------------------------------------------------------------- item 2: load
def test_load_rebuilds_the_requantised_residual_bit_for_bit_and_converts_to_plain_lora(saved, nf4_init, tmp_path):
    from peft import PeftModel

    from fisherlora.adapter import lora_layers

    folder, _ = saved
    result, out = nf4_init[0], nf4_init[3]
    loaded = fisherlora.load(_load(folder, NF4), out, is_trainable=True)
    assert _same_bits(_bits(result.model), _bits(loaded)), "the residual is requantised bit for bit"
    # after training, PEFT's conversion: the plain LoRA's update is s·(BA − B0A0), on the ORIGINAL base
    with torch.no_grad():
        for n, p in loaded.named_parameters():
            if "lora_" in n:
                p.add_(0.01 * torch.randn_like(p))
    loaded.save_pretrained(tmp_path / "plain", path_initial_model_for_weight_conversion=str(out))
    plain = PeftModel.from_pretrained(_load(folder, NF4), str(tmp_path / "plain"))

    def delta(lay):
        return lay.scaling["default"] * (lay.lora_B["default"].weight @ lay.lora_A["default"].weight)

    trained, init, conv = (dict(lora_layers(m)) for m in (loaded, result.model, plain))
    for name, layer in trained.items():
        torch.testing.assert_close(delta(conv[name]), delta(layer) - delta(init[name]), rtol=1e-4, atol=1e-5)


def test_saving_the_residual_of_a_quantised_base_is_refused_before_anything_is_written(saved, nf4_init, tmp_path):
    result = nf4_init[0]
    bits = _bits(result.model)
    with pytest.raises(ValueError, match=r"residual=True.*quantised.*q_proj.*fisherlora\.load"):
        result.save(tmp_path / "out", residual=True)
    assert not (tmp_path / "out").exists() and _same_bits(bits, _bits(result.model))


def test_load_refuses_a_base_of_another_quantisation_or_precision(saved, nf4_init):
    folder, fp = saved
    for other in (_load(folder, "nf4"), _load(folder, "int8"), copy.deepcopy(fp)):
        state = _state(other)
        with pytest.raises(ValueError, match="not the one the adapter was initialised from.*quantisation"):
            fisherlora.load(other, nf4_init[3])
        assert all(torch.equal(v, state[k]) for k, v in _state(other).items())


# ----------------------------------------------------------------------------- item 3: memory
def test_the_decomposition_holds_one_dequantised_layer_at_a_time(tmp_path):
    """Peak of the decomposition phase on 4 decoder layers (28 targets) above the quantised model:
    at most one layer's float32 weight and its SVD workspace, plus the factors it returns."""
    from fisherlora.decompose import compute_initialization
    from fisherlora.layers import find_target_modules, layer_shape
    from fisherlora.svd import svd_workspace_bytes
    from fisherlora.testing import peak_memory

    random_llama(hidden=64, intermediate=256, layers=4).save_pretrained(tmp_path / "fp")
    model = _load(tmp_path / "fp", "nf4")
    cfg = FisherLoraConfig(rank=4, alpha=8, backend="torch", memory_mode="full")
    lora_config = cfg.to_lora_config()
    modules = find_target_modules(model, lora_config)
    stats = fisherlora.collect_statistics(model, modules, _batches(), cfg, progress=False)
    shapes = [layer_shape(m) for m in modules.values()]
    one_layer = max(4 * o * i + svd_workspace_bytes(o, i) for o, i in shapes)
    kept = sum(4 * 4 * (o + i) + 4 * 8 * min(o, i) + 4096 for o, i in shapes)  # B, A, σ/e/score, bookkeeping
    all_dequantised = sum(4 * o * i for o, i in shapes)
    assert all_dequantised > one_layer, "the model is large enough to tell one layer from all"
    peak, how = peak_memory(lambda: compute_initialization(modules, stats, lora_config, cfg, progress=False),
                            torch.device("cpu"))
    assert peak <= one_layer + kept, f"{peak} B > one layer {one_layer} B + factors {kept} B ({how})"


# ----------------------------------------------------------------------------- item 6: refusals by kind
class QuantLinear(nn.Module):  # auto-gptq / gptqmodel's class name; not an nn.Linear
    def __init__(self, d_in, d_out):
        super().__init__()
        self.register_buffer("qweight", torch.zeros(d_in // 8, d_out, dtype=torch.int32))
        self.in_features, self.out_features = d_in, d_out

    def forward(self, x):
        return x.new_zeros(*x.shape[:-1], self.out_features)


class AffineQuantizedTensor(torch.Tensor):  # torchao's class name
    pass


class GGUFParameter(nn.Parameter):  # a GGUF weight kept quantised
    pass


def _gptq(model):
    model.model.layers[0].self_attn.q_proj = QuantLinear(64, 64)
    return model


def _subclass(cls):
    def build(model):
        lin = model.model.layers[1].mlp.up_proj
        w = lin.weight.detach()
        lin.weight = nn.Parameter(w.as_subclass(cls), requires_grad=False) if cls is AffineQuantizedTensor else \
            GGUFParameter(w, requires_grad=False)
        return model
    return build


def _repacked(folder):
    model = _load(folder, "nf4")
    layer = model.model.layers[0].mlp.gate_proj
    layer.support_avx512bf16_for_cpu = True
    with torch.no_grad():
        layer.eval()(torch.zeros(1, 64))
    if not getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not repack here")
    return model


@pytest.mark.parametrize("kind, build, match", [
    ("GPTQ", lambda folder: _gptq(random_llama(hidden=64, intermediate=128)), r"q_proj.*GPTQ"),
    ("torchao", lambda folder: _subclass(AffineQuantizedTensor)(random_llama(hidden=64, intermediate=128)),
     r"up_proj.*torchao"),
    ("GGUF kept quantised", lambda folder: _subclass(GGUFParameter)(random_llama(hidden=64, intermediate=128)),
     r"up_proj.*GGUF"),
    ("bnb repacked for CPU inference", _repacked, r"gate_proj.*repacked for CPU inference"),
])
def test_other_quantised_layers_are_refused_by_kind_before_any_pass_leaving_the_model(saved, kind, build, match):
    model = build(saved[0])

    def never():
        raise AssertionError("a calibration batch was read: the refusal came too late")
        yield

    def tensors():  # not state_dict(): bitsandbytes undoes its CPU repacking there
        return {k: (v.view(torch.uint8) if v.dim() else v).clone()
                for k, v in [*model.named_parameters(), *model.named_buffers()]}

    state = tensors()
    types = {n: type(m) for n, m in model.named_modules()}
    for cfg in (CFG, FisherLoraConfig(rank=4, alpha=8, backend="torch", target_modules=["q_proj", "up_proj",
                                                                                          "gate_proj"])):
        with pytest.raises(ValueError, match=match) as err:
            fisherlora.initialize_fisher_lora(model, None, never(), cfg, progress=False)
        assert "Linear4bit" in str(err.value) and "Linear8bitLt" in str(err.value), "names the supported ones"
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert all(torch.equal(v, state[k]) for k, v in tensors().items())


def _repacked_then_unpacked(model, name="model.layers.0.self_attn.q_proj"):
    """What an eval no-grad forward on an AVX512-BF16 CPU and a later ``state_dict()`` leave in a
    Linear4bit: bitsandbytes' own repacking for CPU inference, then its inverse, which keeps the
    scales bfloat16 in the repacked shape ([1, 64] for a 64x64 layer). Done by hand here, so that
    it happens on any CPU."""
    import bitsandbytes.functional as F

    layer = model.get_submodule(name)
    layer.weight.data, layer.weight.quant_state = F._convert_weight_packed_for_cpu(layer.weight.data,
                                                                                   layer.weight.quant_state)
    model.state_dict()  # bitsandbytes unpacks the layer again here
    qs = layer.weight.quant_state
    assert not qs.packing_format_for_cpu and qs.absmax.dtype == torch.bfloat16 and tuple(qs.absmax.shape) == (1, 64)
    return model


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["v_proj"]])
def test_a_4bit_layer_with_another_layout_is_refused_by_kind_before_any_pass(saved, targets):
    """Issue 30 §6: 4-bit layers repacked for the CPU and unpacked again by ``state_dict()`` (scales
    bf16, shape [1, 64]) ran the whole calibration, then writing failed with "shape '[1, 128]' is
    invalid". Every quantised layer's layout is checked up front, a target or not (the passes read
    them all), naming the layer and its scales; the model is left as it was."""
    model = _repacked_then_unpacked(_load(saved[0], "nf4"))

    def never():
        raise AssertionError("a calibration batch was read: the refusal came too late")
        yield

    before = _bits(model)
    q = model.get_submodule("model.layers.0.self_attn.q_proj").weight
    q_before = (q.data.clone(), q.quant_state.absmax.clone())
    cfg = FisherLoraConfig(rank=4, alpha=8, backend="torch", target_modules=targets)
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj.*bfloat16.*\(1, 64\)") as err:
        fisherlora.initialize_fisher_lora(model, None, never(), cfg, progress=False)
    assert "float32" in str(err.value) and "reload the model" in str(err.value), str(err.value)
    assert _same_bits(_bits(model), before)
    assert torch.equal(q.data, q_before[0]) and torch.equal(q.quant_state.absmax, q_before[1])


# ----------------------------------------------------------------------------- item 4: the memory plan
def test_the_plan_counts_quantised_weights_and_one_dequantised_layer():
    from fisherlora.models import meta_model_from_config
    from fisherlora.plan import choose_mode, plan_memory

    lora = FisherLoraConfig().to_lora_config()
    nf4 = {"bits": 4, "blocksize": 64, "double_quant": False}
    for name, budget in (("llama-3-8b", 12), ("llama-2-70b", 80)):  # fisherlora/configs
        model = meta_model_from_config(name)
        plain = plan_memory(model, lora, dtype=torch.bfloat16, bases_bytes=2)
        plans = plan_memory(model, lora, dtype=torch.bfloat16, bases_bytes=2, quantisation=nf4)
        head = model.get_output_embeddings()
        linear = [m for m in model.modules() if isinstance(m, nn.Linear) and m is not head]
        expected = plain[0].weights - sum(2 * m.weight.numel() for m in linear) + sum(
            quant.planned_weight_bytes(m.out_features, m.in_features, nf4) for m in linear)
        assert all(p.weights == expected for p in plans)
        n = sum(m.weight.numel() for m in linear)
        assert expected - (plain[0].weights - 2 * n) == n // 2 + 4 * (n // 64), "4 bits an entry + an absmax a block"
        for p, q in zip(plain, plans, strict=True):  # one float32 dequantised weight more in those phases
            widest = max(4 * m.weight.numel() for m in linear)
            assert 0 < q.phases["decomposition"] - p.phases["decomposition"] <= widest
        pick = choose_mode(plans, budget * 10**9)
        assert pick.label == "projected" and pick.total <= budget * 10**9, (name, pick.to_dict())
        assert choose_mode(plain, budget * 10**9).total > budget * 10**9, "in bfloat16 it does not fit"
    assert quant.planned_weight_bytes(4096, 4096, {"bits": 8}) == 4096 * 4096 + 4 * 4096
    dq = quant.planned_weight_bytes(4096, 4096, {"bits": 4, "blocksize": 64, "double_quant": True})
    assert dq == 4096 * 4096 // 2 + 4096 * 4096 // 64 + 4 * (4096 * 4096 // 64 // 256) + 4


def test_plan_and_init_commands_take_the_quantisation_flags(tmp_path, capsys):
    import json

    from fisherlora import cli
    from tests.models import save_tiny_model

    assert cli.main(["plan", "--model", "llama-3-8b", "--load-in-4bit", "--free-gb", "12"]) == 0
    out = capsys.readouterr().out
    assert "memory_mode=auto with 12 GB free: projected" in out and "NOTHING FITS" not in out
    # the embedded model is a GGUF file: transformers cannot quantise it on load; refused before any work
    assert cli.main(["init", "--load-in-4bit", "-o", str(tmp_path / "refused"), "--quiet"]) == 2
    assert "GGUF" in capsys.readouterr().err and not (tmp_path / "refused").exists()
    model = save_tiny_model(tmp_path / "model")
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"question": f"what is {i} + {i}?", "answer": f"{2 * i}"}) for i in range(4)))
    argv = ["init", "--model", str(model), "--data", str(data), "--num-samples", "2", "--max-length", "32",
            "--rank", "2", "--backend", "torch", "--quiet", "--device", "cpu"]
    assert cli.main([*argv, "-o", str(tmp_path / "q4"), "--load-in-4bit", "--bnb-4bit-quant-type", "fp4",
                     "--bnb-4bit-double-quant"]) == 0
    report = json.loads((tmp_path / "q4" / "report.json").read_text())
    settings = report["quantisation"]["settings"][0]
    assert "bits=4" in settings and "quant_type=fp4" in settings and "double_quant=True" in settings
    with pytest.raises(SystemExit):  # one of the two
        cli.main([*argv, "-o", str(tmp_path / "q8"), "--load-in-4bit", "--load-in-8bit"])
    assert "not allowed with" in capsys.readouterr().err
    # the residual of a quantised base cannot be saved as a model folder: refused before any work
    # (it used to fail in load_state_dict after the whole calibration)
    for bits in ("--load-in-4bit", "--load-in-8bit"):
        assert cli.main([*argv, "-o", str(tmp_path / "res"), bits, "--save-residual"]) == 2
        err = capsys.readouterr().err
        assert "--save-residual" in err and "quantised" in err and "fisherlora.load" in err, err
        assert not (tmp_path / "res").exists()
