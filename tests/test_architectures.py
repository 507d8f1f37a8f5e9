import logging

import pytest
from transformers import AutoConfig

from hf_llmopt import MODEL_TYPE_TO_ARCH_SPEC, ArchSpec, UnsupportedArchitectureError, get_arch_spec, register_arch_spec
from hf_llmopt.architectures import AttentionSpec
from tiny_models import tiny_config


@pytest.mark.parametrize("model_type", sorted(MODEL_TYPE_TO_ARCH_SPEC))
def test_table_entry_names_real_modules(model_type):
    """Every name in the table exists in the family's real modules."""
    from transformers import AutoModelForCausalLM

    spec = MODEL_TYPE_TO_ARCH_SPEC[model_type]
    model = AutoModelForCausalLM.from_config(tiny_config(model_type))
    layer = model.get_submodule(spec.layers)[0]
    attention = layer.get_submodule(spec.attention.module)
    for name in spec.attention.projection_names:
        assert hasattr(attention, name), f"{model_type}: attention has no {name}"
    if spec.attention.kv_norm:
        assert hasattr(attention, spec.attention.kv_norm)
    mlp = layer.get_submodule(spec.mlp.module) if spec.mlp.module else layer
    if not hasattr(mlp, "experts"):  # sparse families: their MLP entry is for the MoE features
        for name in spec.mlp.projection_names:
            assert hasattr(mlp, name), f"{model_type}: mlp has no {name}"


def test_unknown_family_error_names_close_matches_and_lists_all():
    config = AutoConfig.for_model("llama")
    config.model_type = "lama"
    config.base_model_tp_plan = {}
    with pytest.raises(UnsupportedArchitectureError) as err:
        get_arch_spec(config)
    message = str(err.value)
    assert "'lama'" in message and "Did you mean 'llama'" in message
    for family in MODEL_TYPE_TO_ARCH_SPEC:
        assert family in message


def test_explicit_spec_wins_over_table():
    custom = ArchSpec("llama", attention=AttentionSpec(o="dense"))
    assert get_arch_spec(AutoConfig.for_model("llama"), custom) is custom


def test_inferred_from_tp_plan_with_one_warning(caplog):
    config = AutoConfig.for_model("llama")
    config.model_type = "my_llama_variant"
    with caplog.at_level(logging.WARNING):
        spec = get_arch_spec(config)
        get_arch_spec(config)
    assert spec.inferred and spec.attention.k == "k_proj" and spec.mlp.gate == "gate_proj"
    assert sum("my_llama_variant" in r.message for r in caplog.records) == 1


def test_closed_schema_refuses_unknown_keys():
    with pytest.raises(ValueError, match="Unknown key"):
        ArchSpec.from_dict({"model_type": "x", "attention": {"q": "q_proj", "q_porj": "typo"}})
    with pytest.raises(ValueError, match="Unknown key"):
        ArchSpec.from_dict({"model_type": "x", "layer": "model.layers"})
    spec = ArchSpec.from_dict({"model_type": "x", "attention": {"o": "dense"}, "mlp": {"gate": None}})
    assert spec.attention.o == "dense" and spec.mlp.gate is None


def test_invalid_layout_values_are_refused():
    with pytest.raises(ValueError, match="layout"):
        AttentionSpec(layout="zigzag")
    with pytest.raises(ValueError, match="qkv"):
        AttentionSpec(layout="fused_concat")


def test_register_guards_duplicates():
    spec = ArchSpec("llama")
    with pytest.raises(ValueError, match="already registered"):
        register_arch_spec(spec)
    original = MODEL_TYPE_TO_ARCH_SPEC["llama"]
    try:
        assert register_arch_spec(spec, overwrite=True) is spec
    finally:
        register_arch_spec(original, overwrite=True)


def test_lora_targets_come_from_the_table():
    assert MODEL_TYPE_TO_ARCH_SPEC["llama"].lora_target_modules == (
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert MODEL_TYPE_TO_ARCH_SPEC["phi3"].lora_target_modules == ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
