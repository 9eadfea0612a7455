import pytest
from torch import nn

from slimlm.errors import SlimlmError
from slimlm.models.adapter import ModelAdapter, linear_shape
from slimlm.models.tiny import TINY_FAMILIES, tiny_model

EXPECTED_LINEARS = {
    "llama": {"q", "k", "v", "o", "gate", "up", "down"},
    "qwen2": {"q", "k", "v", "o", "gate", "up", "down"},
    "mistral": {"q", "k", "v", "o", "gate", "up", "down"},
    "gemma": {"q", "k", "v", "o", "gate", "up", "down"},
    "gemma2": {"q", "k", "v", "o", "gate", "up", "down"},
    "gemma3_text": {"q", "k", "v", "o", "gate", "up", "down"},
    "opt": {"q", "k", "v", "o", "up", "down"},
    "gpt2": {"qkv", "o", "up", "down"},
    "qwen3": {"q", "k", "v", "o", "gate", "up", "down"},
    "phi3": {"qkv", "o", "gate_up", "down"},
    "phi": {"q", "k", "v", "o", "up", "down"},
    "gpt_neox": {"qkv", "o", "up", "down"},
    "falcon": {"qkv", "o", "up", "down"},
}
EXPECTED_NORMS = {
    "gemma2": {"attn_norm", "attn_out_norm", "mlp_norm", "mlp_out_norm"},
    "gemma3_text": {"attn_norm", "attn_out_norm", "mlp_norm", "mlp_out_norm", "q_norm", "k_norm"},
    "qwen3": {"attn_norm", "mlp_norm", "q_norm", "k_norm"},
    "phi": {"attn_norm"},  # one norm in front of the parallel attention and MLP
}


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_adapter_finds_every_part(family):
    model = tiny_model(family)
    adapter = ModelAdapter(model)
    assert len(adapter) == 2
    assert adapter.embedding is model.get_input_embeddings()
    assert adapter.lm_head is model.get_output_embeddings()
    assert adapter.final_norm is not None and adapter.final_norm not in [m for b in adapter for m in b.norms.values()]
    for block in adapter:
        assert set(block.linears) == EXPECTED_LINEARS[family]
        assert set(block.norms) == EXPECTED_NORMS.get(family, {"attn_norm", "mlp_norm"})
        assert block.module is adapter.blocks[block.index]
    assert (adapter.position_embedding is not None) == (family in ("opt", "gpt2"))
    # 2 blocks x every linear, each with a unique full name that resolves in the model.
    names = adapter.linear_layers()
    assert len(names) == 2 * len(EXPECTED_LINEARS[family])
    for name, module in names.items():
        assert model.get_submodule(name) is module


def test_norm_roles_follow_dataflow_in_gemma2():
    """Gemma 2's post_attention_layernorm normalises the attention output; its MLP input norm is another."""
    block = ModelAdapter(tiny_model("gemma2"))[0]
    assert block.norm_names["attn_out_norm"] == "post_attention_layernorm"
    assert block.norm_names["mlp_norm"] == "pre_feedforward_layernorm"
    llama_block = ModelAdapter(tiny_model("llama"))[0]
    assert llama_block.norm_names["mlp_norm"] == "post_attention_layernorm"


def test_gpt2_fused_qkv_shape():
    block = ModelAdapter(tiny_model("gpt2"))[0]
    assert linear_shape(block.linears["qkv"]) == (64, 192)
    assert linear_shape(block.linears["down"]) == (256, 64)


def test_real_model_adapter(real_model):
    adapter = ModelAdapter(real_model.model)
    assert len(adapter) == 30
    assert adapter.tied_embeddings
    block = adapter[0]
    assert linear_shape(block.linears["q"]) == (576, 576)
    assert linear_shape(block.linears["k"]) == (576, 192)  # 3 KV heads of 64: grouped-query attention
    assert linear_shape(block.linears["down"]) == (1536, 576)


def test_unsupported_architecture_is_a_clear_error():
    class NotAnLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])

    model = tiny_model("llama")
    model.model.layers = nn.ModuleList([nn.Sequential(nn.Linear(64, 64)) for _ in range(2)])
    with pytest.raises(SlimlmError, match="unsupported architecture"):
        ModelAdapter(model)
