"""config.json parsing: both spellings, quantization, and a clear message for every bad value."""

import json

import pytest

from engine.config import ModelConfig
from engine.errors import ConfigError
from engine.presets import tiny, v3


@pytest.mark.parametrize("make", [tiny, v3, lambda: tiny(fp8=True)])
def test_both_spellings_round_trip(make):
    cfg = make()
    assert ModelConfig.from_dict(cfg.to_official_dict()) == cfg
    assert ModelConfig.from_dict(cfg.to_transformers_dict()) == cfg


def test_official_release_keys():
    raw = v3().to_official_dict()
    assert raw["rope_scaling"]["type"] == "yarn" and raw["torch_dtype"] == "bfloat16"
    assert raw["quantization_config"]["weight_block_size"] == [128, 128]
    cfg = ModelConfig.from_dict(raw)
    # DeepSeek-V3: mscale(40, 1.0)^2 = (0.1 ln 40 + 1)^2 applied to the softmax scale, cos/sin unscaled.
    assert cfg.softmax_scale == pytest.approx(192**-0.5 * (0.1 * 3.6888794541139363 + 1) ** 2)
    assert cfg.rope.cos_sin_scale == 1.0
    assert cfg.kv_cache_dim == 576


def test_transformers_spelling_without_quant_or_yarn():
    raw = tiny().to_transformers_dict()
    raw["rope_parameters"] = {"rope_type": "default", "rope_theta": 5000.0}
    raw["rope_interleave"] = False
    raw["q_lora_rank"] = None
    cfg = ModelConfig.from_dict(raw)
    assert cfg.rope is None and cfg.rope_theta == 5000.0 and not cfg.rope_interleave and cfg.q_lora_rank is None


def test_from_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config.json"):
        ModelConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(tiny().to_official_dict()))
    assert ModelConfig.from_file(tmp_path) == tiny()


def _bad(**changes):
    raw = tiny().to_official_dict()
    for k, v in changes.items():
        if v is None and k in raw and k != "q_lora_rank":
            del raw[k]
        else:
            raw[k] = v
    return raw


@pytest.mark.parametrize(
    "changes, key",
    [
        ({"n_group": 3}, "n_group"),
        ({"topk_group": 5}, "topk_group"),
        ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
        ({"n_group": 16, "topk_group": 2}, "2 experts"),
        ({"qk_rope_head_dim": 7}, "qk_rope_head_dim"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"hidden_size": None}, "hidden_size"),
        ({"hidden_size": "64"}, "hidden_size"),
        ({"first_k_dense_replace": 9}, "first_k_dense_replace"),
        ({"scoring_func": "softmax"}, "scoring_func"),
        ({"topk_method": "greedy"}, "topk_method"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_scaling": {"type": "linear", "factor": 2}}, "rope_scaling"),
        ({"rope_scaling": {"type": "yarn"}}, "factor"),
        ({"rope_scaling": {"type": "yarn", "factor": 4, "bogus": 1}}, "bogus"),
        ({"torch_dtype": "int8"}, "torch_dtype"),
        ({"quantization_config": {"quant_method": "awq"}}, "quant_method"),
        ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128]}}, "weight_block_size"),
        ({"num_key_value_heads": 1}, "num_key_value_heads"),
        ({"q_lora_rank": -1}, "q_lora_rank"),
    ],
)
def test_bad_values_name_the_key(changes, key):
    with pytest.raises(ConfigError, match=key):
        ModelConfig.from_dict(_bad(**changes))


def test_replace_revalidates():
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        tiny().replace(num_hidden_layers=0)
    assert tiny().replace(num_hidden_layers=2).num_hidden_layers == 2
