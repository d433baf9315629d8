"""Target layers: names, kinds, groups, ranks, orientation and fingerprints."""

import pytest
import torch
from torch import nn

from fisherlora.layers import (
    check_ranks,
    decoder_layer_index,
    fingerprints_match,
    layer_groups,
    layer_kind,
    layer_shape,
    weight_fingerprint,
    weight_view,
    write_weight,
)
from tests.models import tiny_gpt2


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
