"""Target layers: names, kinds, groups, ranks, orientation and fingerprints."""

import pytest
import torch
from torch import nn

from fisherlora.fingerprint import fingerprints_match, weight_fingerprint
from fisherlora.layers import (
    check_ranks,
    decoder_layer_index,
    layer_groups,
    layer_kind,
    layer_shape,
    weight_view,
    write_weight,
)
from fisherlora.testing import random_llama
from tests.models import tiny_gpt2, tiny_llama


@pytest.mark.parametrize("name, index, kind", [
    ("model.layers.7.self_attn.q_proj", ("model.layers", 7), "self_attn.q_proj"),
    ("transformer.h.0.attn.c_attn", ("transformer.h", 0), "attn.c_attn"),
    ("model.layers.12.mlp.experts.3.up_proj", ("model.layers", 12), "mlp.experts.3.up_proj"),
    ("lm_head", None, "lm_head"),
])
def test_decoder_index_and_kind_come_from_one_parser(name, index, kind):
    assert decoder_layer_index(name) == index
    assert layer_kind(name) == kind


def test_layer_groups_are_contiguous_and_modules_outside_the_stack_join_the_first():
    names = ["lm_head"] + [f"model.layers.{i}.{p}" for i in range(5) for p in ("q", "v")]
    groups = layer_groups({n: None for n in names}, 2)
    assert [sorted({decoder_layer_index(n)[1] for n in g if decoder_layer_index(n)}) for g in groups] == [
        [0, 1], [2, 3, 4]]  # the modules outside the stack take a slot of the first group
    assert "lm_head" in groups[0]
    assert len(layer_groups({n: None for n in names}, 99)) == 5 + 1  # at most one group per index


def test_rank_check_names_the_layer_and_its_shape():
    check_ranks({"a": (4, 6)}, {"a": 4})
    with pytest.raises(ValueError, match=r"rank 5 exceeds min\(d_out, d_in\) = 4 of layer 'a' \(4x6\)"):
        check_ranks({"a": (4, 6)}, {"a": 5})


def test_conv1d_weights_are_viewed_and_written_as_d_out_by_d_in():
    conv = tiny_gpt2(torch.float32).transformer.h[0].mlp.c_fc  # stored (d_in=24, d_out=96)
    assert tuple(conv.weight.shape) == (24, 96) and layer_shape(conv) == (96, 24)
    W = torch.randn(96, 24)
    write_weight(conv, W)
    x = torch.randn(3, 24)
    torch.testing.assert_close(conv(x), x @ W.T + conv.bias)
    lin = nn.Linear(24, 96)
    write_weight(lin, W)
    assert torch.equal(weight_view(lin), W)


def test_fingerprints_see_a_permutation_and_a_small_step_but_not_a_copy():
    W = torch.randn(40, 30, generator=torch.Generator().manual_seed(0))
    fp = weight_fingerprint(W)
    assert fingerprints_match(fp, weight_fingerprint(W.clone()))
    assert not fingerprints_match(fp, weight_fingerprint(W.flip(0)))
    assert not fingerprints_match(fp, weight_fingerprint(W + 0.01 * W.std() * torch.randn_like(W)))


# ----------------------------------------------------------------------------- what is refused up front
def _never():
    raise AssertionError("a calibration batch was read: the refusal came too late")
    yield


def _placeholder(model):
    """DeepSpeed ZeRO-3 leaves empty (or 1-D) placeholders in place of partitioned weights."""
    lin = model.model.layers[0].self_attn.q_proj
    lin.weight = nn.Parameter(torch.empty(0), requires_grad=False)
    lin.weight.ds_shape = (32, 32)
    return model


def _int_weight(model):
    lin = model.model.layers[1].mlp.down_proj
    lin.weight = nn.Parameter(torch.zeros(lin.weight.shape, dtype=torch.int8), requires_grad=False)
    return model


@pytest.mark.parametrize("kind, build, match", [
    ("ZeRO-3 placeholder", lambda tmp: _placeholder(tiny_llama(torch.float32)), "empty.*shard"),
    ("integer weight", lambda tmp: _int_weight(tiny_llama(torch.float32)), r"down_proj.*\bint8"),
    ("meta device", lambda tmp: __import__("fisherlora.models").models.meta_model_from_config(
        tiny_llama(torch.float32).config), "meta device"),
])
def test_weights_that_are_not_plain_float_parameters_are_refused_before_any_pass(tmp_path, kind, build, match):
    import fisherlora
    from tests.models import CFG

    model = build(tmp_path)
    with pytest.raises(ValueError, match=match) as err:
        fisherlora.initialize_fisher_lora(model, None, _never(), CFG, progress=False)
    assert "supports" in str(err.value), "the message says what is supported"


def _two_modules_one_weight(model):
    model.model.layers[1].self_attn.o_proj.weight = model.model.layers[0].self_attn.o_proj.weight
    return model


@pytest.mark.parametrize("kind, build, targets, match", [
    ("tied embeddings, lm_head targeted", lambda: random_llama(tie_word_embeddings=True), ["q_proj", "lm_head"],
     r"'lm_head'.*shares its weight with .*embed_tokens"),
    ("one Parameter in two layers", lambda: _two_modules_one_weight(tiny_llama(torch.float32)), ["o_proj"],
     r"layers\.\d\.self_attn\.o_proj.*shares its weight with .*layers\.\d\.self_attn\.o_proj"),
])
def test_weights_shared_with_another_module_are_refused_by_storage(kind, build, targets, match):
    import fisherlora
    from fisherlora import FisherLoraConfig

    model = build()
    cfg = FisherLoraConfig(rank=4, alpha=8, backend="torch", target_modules=targets)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        fisherlora.initialize_fisher_lora(model, None, _never(), cfg, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("where, value", [
    ("model.embed_tokens.weight", float("nan")),        # read by the pass, not a target
    ("model.layers.1.mlp.up_proj.weight", float("inf")),  # a target
    ("model.layers.0.input_layernorm.weight", float("-inf")),
])
def test_non_finite_weights_are_found_before_the_passes_naming_where(where, value):
    import fisherlora
    from tests.models import CFG

    model = tiny_llama(torch.float32)
    with torch.no_grad():
        model.get_parameter(where).view(-1)[3] = value
    with pytest.raises(FloatingPointError, match=where.replace(".", r"\.")):
        fisherlora.initialize_fisher_lora(model, None, _never(), CFG, progress=False)


# ----------------------------------------------------------------------------- wrappers
class _MyWrapper(nn.Module):
    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, **kw):
        return self.lm(**kw)


@pytest.mark.parametrize("wrap", [torch.nn.DataParallel, torch.compile], ids=["DataParallel", "torch.compile"])
def test_a_wrapped_model_gives_the_same_adapter_which_loads_on_the_unwrapped_base(tmp_path, wrap):
    import fisherlora
    from tests.models import CFG, batches, logits, probe

    plain = fisherlora.initialize_fisher_lora(tiny_llama(torch.float32), None, batches(), CFG, progress=False)
    wrapped = fisherlora.initialize_fisher_lora(wrap(tiny_llama(torch.float32)), None, batches(), CFG,
                                                progress=False)
    assert list(wrapped.selections) == list(plain.selections)
    for name, sel in wrapped.selections.items():
        assert torch.equal(sel.indices, plain.selections[name].indices)
    out = wrapped.save(tmp_path / "out")
    ids = probe()
    loaded = fisherlora.load(tiny_llama(torch.float32), out)
    torch.testing.assert_close(logits(loaded, ids), logits(plain.model, ids))


def test_an_unknown_wrapper_around_a_transformers_model_is_refused_naming_the_inner_model():
    import fisherlora
    from tests.models import CFG

    with pytest.raises(ValueError, match=r"_MyWrapper wraps a transformers model .*at 'lm'.*pass .*\.lm"):
        fisherlora.initialize_fisher_lora(_MyWrapper(tiny_llama(torch.float32)), None, _never(), CFG, progress=False)
