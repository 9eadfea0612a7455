"""LLM-Pruner: coupled groups removed by Taylor importance; a smaller plain transformers model."""

import pytest
import torch

from slimlm.compress import compress, load_recipe
from slimlm.errors import SlimlmError
from slimlm.models.adapter import ModelAdapter
from slimlm.models.tiny import tiny_model
from tests.helpers import assert_plain_transformers_roundtrip

CALIBRATION = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
PROBE = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))


def prune(model, **stage):
    recipe = {"stages": [{"method": "llm_pruner", **stage}], "calibration": {"batch_size": 2},
             "float_storage": "float32"}  # exactness checks: no bfloat16 rounding
    return compress(model, load_recipe(recipe), calibration=CALIBRATION)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma", "gemma2", "gemma3_text"])
def test_pruned_model_is_smaller_and_loads_with_plain_transformers(family, tmp_path):
    model = tiny_model(family)
    before = sum(p.numel() for p in model.parameters())
    report = prune(model, ratio=0.5)
    summary = report.structure[0]
    assert model.config.num_key_value_heads == 1 and model.config.num_attention_heads == 2
    assert model.config.intermediate_size == 64
    assert summary["parameters_after"] == sum(p.numel() for p in model.parameters()) < before
    assert_plain_transformers_roundtrip(model, tmp_path, PROBE)


def test_the_least_important_mlp_channels_go():
    model = tiny_model("llama")
    with torch.no_grad():  # channels 0..63 of every MLP do nothing: zero rows and columns
        for layer in model.model.layers:
            layer.mlp.up_proj.weight[:64] = 0
            layer.mlp.gate_proj.weight[:64] = 0
            layer.mlp.down_proj.weight[:, :64] = 0
    prune(model, ratio=0.5)
    assert model.config.intermediate_size == 64
    assert all(layer.mlp.up_proj.weight.abs().sum(dim=1).min() > 0 for layer in model.model.layers)


def test_vector_wise_importance_and_lora_recovery_run():
    model = tiny_model("llama")
    report = prune(model, ratio=0.25, importance="vector", aggregation="max",
                   recovery={"steps": 3, "rank": 2, "batch_size": 2, "lr": 1e-3})
    assert report.structure[0]["recovery"]["tokens"] == 3 * 2 * 32
    assert not any("lora" in name for name, _ in model.named_parameters())


def test_fused_qkv_models_are_refused_before_any_work():
    model = tiny_model("gpt2")
    with pytest.raises(SlimlmError, match="fused qkv is not supported"):
        prune(model, ratio=0.2)
    assert len(ModelAdapter(model).blocks) == 2


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_removing_a_dead_attention_group_and_dead_channels_keeps_the_outputs(family):
    model = tiny_model(family)
    config = model.config
    per_group = config.num_attention_heads // config.num_key_value_heads
    head_dim = config.head_dim
    with torch.no_grad():  # KV group 1 and MLP channels 64.. contribute nothing: zero o columns, down columns
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[:, per_group * head_dim :] = 0
            layer.self_attn.q_proj.weight[per_group * head_dim :] = 0
            layer.self_attn.k_proj.weight[head_dim:] = 0
            layer.self_attn.v_proj.weight[head_dim:] = 0
            layer.mlp.down_proj.weight[:, 64:] = 0
            layer.mlp.up_proj.weight[64:] = 0
            layer.mlp.gate_proj.weight[64:] = 0
        reference = model(PROBE).logits
    prune(model, ratio=0.5)
    assert model.config.num_key_value_heads == 1 and model.config.intermediate_size == 64
    with torch.no_grad():
        assert torch.allclose(model(PROBE).logits, reference, atol=1e-5)


def test_query_head_units_keep_every_kv_head_and_reload(tmp_path):
    model = tiny_model("llama")  # 4 query heads over 2 KV heads
    with torch.no_grad():  # query heads 1 and 3 (one in each group) contribute nothing
        for layer in model.model.layers:
            for head in (1, 3):
                layer.self_attn.o_proj.weight[:, head * 16 : (head + 1) * 16] = 0
                layer.self_attn.q_proj.weight[head * 16 : (head + 1) * 16] = 0
    report = prune(model, ratio=0.5, attention_unit="query_head")
    assert report.structure[0]["attention_heads"] == [4, 2] and report.structure[0]["kv_heads"] == [2, 2]
    for layer in model.model.layers:  # the dead heads are the ones that went
        assert layer.self_attn.q_proj.weight.reshape(2, -1).abs().sum(dim=1).min() > 0
    assert_plain_transformers_roundtrip(model, tmp_path, PROBE)
