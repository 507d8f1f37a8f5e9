import pytest
import torch
from transformers import AutoConfig, AutoModel

from hf_llmopt import GQAConfig, UnsupportedArchitectureError, convert_to_gqa
from tiny_models import tiny_model


def test_g_must_divide_query_heads_and_valid_values_are_named():
    model = tiny_model("llama", num_attention_heads=6, hidden_size=48, num_key_value_heads=6)
    with pytest.raises(ValueError, match=r"does not divide the 6 query heads; valid values for this model: \[1, 2, 3, 6\]"):
        convert_to_gqa(model, 4)


@pytest.mark.parametrize("bad", [0, -1])
def test_g_below_one(bad):
    with pytest.raises(ValueError, match="must be >= 1"):
        convert_to_gqa(tiny_model("llama"), bad)


@pytest.mark.parametrize("bad", [1.5, "2", True])
def test_g_must_be_an_int(bad):
    with pytest.raises(TypeError, match="must be an int"):
        convert_to_gqa(tiny_model("llama"), bad)


def test_unknown_method():
    with pytest.raises(ValueError, match="method='median' is not one of"):
        convert_to_gqa(tiny_model("llama"), 2, method="median")
    with pytest.raises(ValueError, match="method"):
        GQAConfig(2, method="median")


def test_not_a_causal_lm():
    base = AutoModel.from_config(AutoConfig.for_model("llama", hidden_size=32, num_hidden_layers=1,
                                                      num_attention_heads=2, intermediate_size=32, vocab_size=64))
    with pytest.raises(TypeError, match="needs a causal language model.*LlamaModel"):
        convert_to_gqa(base, 1)
    with pytest.raises(TypeError, match="causal language model"):
        convert_to_gqa(torch.nn.Linear(2, 2), 1)


def test_unknown_family():
    model = tiny_model("llama")
    model.config.model_type = "mystery"
    model.config.base_model_tp_plan = {}
    with pytest.raises(UnsupportedArchitectureError, match="'mystery' is not in hf_llmopt's architecture table"):
        convert_to_gqa(model, 2)
