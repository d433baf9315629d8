"""FisherLoraConfig validation: errors name the field."""

import pytest

from fisherlora import FisherLoraConfig


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"rank": 0}, "rank"), ({"rank": 2.5}, "rank"), ({"alpha": float("inf")}, "alpha"),
        ({"alpha": -1}, "alpha"), ({"alpha": "16"}, "alpha"), ({"damping": float("nan")}, "damping"),
        ({"use_rslora": "no"}, "use_rslora"), ({"seed": "x"}, "seed"), ({"score": "loud"}, "score"),
        ({"magnitude": "big"}, "magnitude"), ({"memory_mode": "tiny"}, "memory_mode"),
        ({"layer_groups": 0}, "layer_groups"), ({"stats_dtype": "bfloat16"}, "stats_dtype"),
        ({"backend": "cublas"}, "backend"), ({"target_modules": []}, "target_modules"),
        ({"bases_dtype": "int8"}, "bases_dtype"), ({"fisher_type": "approximate"}, "fisher_type"),
    ],
)
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"FisherLoraConfig.{field}"):
        FisherLoraConfig(**kwargs)


def test_defaults_and_lora_config():
    cfg = FisherLoraConfig(score="fisher_sigma", target_modules=("q_proj", "v_proj"))
    assert cfg.num_samples == 128 and cfg.max_length == 512 and cfg.score.value == "fisher_sigma"
    lc = cfg.to_lora_config()
    assert lc.r == 16 and lc.lora_alpha == 16 and set(lc.target_modules) == {"q_proj", "v_proj"}
    assert cfg.to_dict()["memory_mode"] == "full"
