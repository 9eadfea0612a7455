"""GGUF export: slimlm's codes carried into GGUF blocks, read back with gguf-py and compared to slimlm's weights.

llama.cpp itself is not needed here (the benchmark `benchmarks/gguf_export.py` runs it); transformers'
own GGUF loader is the independent reader for the end-to-end logits check.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slimlm.compress import compress
from slimlm.errors import SlimlmError
from slimlm.export.gguf import export_gguf
from slimlm.models.tiny import tiny_model
from tests.helpers import small_bpe_tokenizer

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.usefixtures("one_thread")
CALIBRATION = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
LINEARS = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
           "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
           "ffn_down": "mlp.down_proj"}


@pytest.fixture(scope="module")
def small_tokenizer():
    return small_bpe_tokenizer()


def export(model, tokenizer, path, **options):
    """export_gguf with the small tokenizer, whose pre-tokenizer is GPT-2's (no check hash to find it by)."""
    return export_gguf(model, tokenizer, path, **{"pre_tokenizer": "gpt-2", **options})


def quantized(tokenizer, family="llama", method="rtn", **stage):
    model = tiny_model(family, vocab_size=len(tokenizer))
    if stage:
        compress(model, {"stages": [{"method": method, **stage}]}, calibration=CALIBRATION)
    return model


def permuted(weight: torch.Tensor, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order, written independently of the exporter (convert_hf_to_gguf's `permute`)."""
    w = weight.numpy()
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_back(path) -> dict[str, tuple[str, np.ndarray]]:
    """{tensor name: (GGUF type, dequantized float32 array in (rows, columns) order)}."""
    reader = gguf.GGUFReader(str(path))
    out = {}
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        out[tensor.name] = (tensor.tensor_type.name, values.reshape(tuple(reversed(tensor.shape.tolist()))))
    return out


def slimlm_weights(model) -> dict[str, np.ndarray]:
    """slimlm's dequantized linear weights under GGUF names, q/k rows in llama.cpp's order."""
    config, out = model.config, {}
    for index, block in enumerate(model.model.layers):
        for short, local in LINEARS.items():
            module = block.get_submodule(local)
            weight = module.dequantize_weight() if hasattr(module, "dequantize_weight") else module.weight.detach()
            if short in ("attn_q", "attn_k") and config.model_type == "llama":
                heads = config.num_attention_heads if short == "attn_q" else config.num_key_value_heads
                out[f"blk.{index}.{short}.weight"] = permuted(weight.float(), heads)
            else:
                out[f"blk.{index}.{short}.weight"] = weight.float().numpy()
    return out


@pytest.mark.parametrize("bits, symmetric, group_size, expected", [
    (4, True, 32, "Q4_0"), (4, True, 64, "Q4_0"), (8, True, 32, "Q8_0"), (8, True, "channel", "Q8_0"),
    (5, True, 32, "Q5_0"), (3, True, 32, "Q4_0"),
])
def test_symmetric_grids_are_carried_bit_exactly(small_tokenizer, tmp_path, bits, symmetric, group_size, expected):
    model = quantized(small_tokenizer, bits=bits, group_size=group_size, symmetric=symmetric)
    result = export(model, small_tokenizer, tmp_path / "m.gguf")
    written, reference = read_back(tmp_path / "m.gguf"), slimlm_weights(model)
    for name, weight in reference.items():
        kind, values = written[name]
        assert kind == expected, name
        np.testing.assert_array_equal(values, weight, err_msg=name)
    carried = [t for t in result.tensors if t.how == "carried"]
    assert len(carried) == 14 and all(t.max_abs_error == 0 and t.max_error_steps == 0 for t in carried)


@pytest.mark.parametrize("bits, expected", [(4, "Q4_1"), (5, "Q5_1"), (3, "Q4_1")])
def test_asymmetric_grids_are_carried_within_the_float16_offset_rounding(small_tokenizer, tmp_path, bits, expected):
    model = quantized(small_tokenizer, bits=bits, group_size=32, symmetric=False)
    result = export(model, small_tokenizer, tmp_path / "m.gguf")
    written, reference = read_back(tmp_path / "m.gguf"), slimlm_weights(model)
    # m = -scale * zero rounded to float16: |error| <= 2^-11 |m| <= 2^-11 (2^bits - 1) steps
    bound = 2.0 ** -11 * (2 ** bits - 1)
    for name, weight in reference.items():
        kind, values = written[name]
        assert kind == expected
        step = np.abs(weight).max()  # loose scale only for the assertion message
        assert np.abs(values - weight).max() <= step, name
    steps = [t.max_error_steps for t in result.tensors if t.how == "carried"]
    assert len(steps) == 14 and max(steps) <= bound
    assert result.summary()["carried_max_error_steps"] == max(steps)


def test_asymmetric_4bit_to_q8_0_is_exact(small_tokenizer, tmp_path):
    """q = code - zero fits int8: an asymmetric grid is carried by Q8_0 without any offset rounding."""
    model = quantized(small_tokenizer, bits=4, group_size=32, symmetric=False)
    export(model, small_tokenizer, tmp_path / "m.gguf", ftype="q8_0", exact=True)
    written = read_back(tmp_path / "m.gguf")
    for name, weight in slimlm_weights(model).items():
        assert written[name][0] == "Q8_0"
        np.testing.assert_array_equal(written[name][1], weight)


def test_float32_scales_are_rounded_and_the_rounding_reported(small_tokenizer, tmp_path):
    model = quantized(small_tokenizer, bits=4, group_size=32, symmetric=True)
    layer = model.model.layers[0].mlp.down_proj
    layer.scale = layer.scale.float() * (1 + 1e-4)  # no longer float16 values
    result = export(model, small_tokenizer, tmp_path / "m.gguf")
    record = next(t for t in result.tensors if t.name == "blk.0.ffn_down.weight")
    assert 0 < record.scale_rounding_rel_max <= 2.0 ** -11 and record.scale_rounding_rel_mean <= record.scale_rounding_rel_max
    assert record.max_abs_error > 0 and result.summary()["scale_rounding_rel_max"] == record.scale_rounding_rel_max


def test_float_model_is_requantized_with_the_error_reported(small_tokenizer, tmp_path):
    model = quantized(small_tokenizer)  # float
    result = export(model, small_tokenizer, tmp_path / "m.gguf", ftype="q4_0")
    written = read_back(tmp_path / "m.gguf")
    for name, weight in slimlm_weights(model).items():
        kind, values = written[name]
        expected = gguf.quants.dequantize(gguf.quants.quantize(weight, gguf.GGMLQuantizationType.Q4_0),
                                          gguf.GGMLQuantizationType.Q4_0)
        assert kind == "Q4_0"
        np.testing.assert_array_equal(values, expected)
    linear = [t for t in result.tensors if t.name.startswith("blk.") and len(t.shape) == 2]
    assert all(t.how == "requantized" and 0 < t.rel_rms_error < 0.2 for t in linear)
    norms = [t for t in result.tensors if t.name.endswith("norm.weight")]
    assert norms and all(t.ggml_type == "F32" for t in norms)
    embedding = written["token_embd.weight"]
    assert embedding[0] == "Q8_0" and written["output.weight"][0] == "Q8_0"


def test_groups_that_split_a_block_are_requantized_or_refused(small_tokenizer, tmp_path):
    model = quantized(small_tokenizer, bits=4, group_size=48, symmetric=True)  # 48-column groups straddle blocks
    with pytest.raises(SlimlmError, match="32-column blocks"):
        export(model, small_tokenizer, tmp_path / "auto.gguf")
    assert not (tmp_path / "auto.gguf").exists()
    result = export(model, small_tokenizer, tmp_path / "q4.gguf", ftype="q4_0")
    linear = [t for t in result.tensors if t.name.startswith("blk.") and len(t.shape) == 2]
    assert all(t.how == "requantized" and t.rel_rms_error > 0 for t in linear)


def test_bad_inputs_are_refused_before_writing_with_the_formats_that_fit(small_tokenizer, tmp_path):
    out = tmp_path / "m.gguf"
    model = quantized(small_tokenizer, bits=3, group_size=32, symmetric=False)
    with pytest.raises(SlimlmError, match="formats that carry it exactly: q4_1, q5_1, q8_0"):
        export(model, small_tokenizer, out, ftype="q4_0", exact=True)
    with pytest.raises(SlimlmError, match="K-quants"):
        export(model, small_tokenizer, out, ftype="q4_k_m")
    with pytest.raises(SlimlmError, match="unknown ftype"):
        export(model, small_tokenizer, out, ftype="q3")
    fp8 = quantized(small_tokenizer, bits=8, group_size="channel", symmetric=True, fmt="fp8_e4m3")
    with pytest.raises(SlimlmError, match="integer grids only"):
        export(fp8, small_tokenizer, out)
    act_order = quantized(small_tokenizer, method="gptq", bits=4, group_size=32, symmetric=True, act_order=True)
    with pytest.raises(SlimlmError, match="static_groups"):
        export(act_order, small_tokenizer, out)
    with pytest.raises(SlimlmError, match="supports the llama"):
        export(tiny_model("gpt2", vocab_size=len(small_tokenizer)), small_tokenizer, out)
    assert list(tmp_path.iterdir()) == []


def test_w8a8_is_refused_unless_activation_quantization_is_dropped(small_tokenizer, tmp_path):
    from slimlm.compress.recipe import load_recipe

    model = quantized(small_tokenizer)
    compress(model, load_recipe("rtn-w8a8"), calibration=CALIBRATION)
    with pytest.raises(SlimlmError, match="drop-activation-quant"):
        export(model, small_tokenizer, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()
    result = export(model, small_tokenizer, tmp_path / "m.gguf", drop_activation_quantization=True)
    written = read_back(tmp_path / "m.gguf")
    for name, weight in slimlm_weights(model).items():  # int8 codes kept; float32 row scales rounded to float16
        assert written[name][0] == "Q8_0"
        assert (np.abs(written[name][1] - weight) <= np.abs(weight) * 2.0 ** -11 + 1e-12).all()
    carried = [t for t in result.tensors if t.how == "carried"]
    assert len(carried) == 14 and all(0 < t.scale_rounding_rel_max <= 2.0 ** -11 for t in carried)
    assert result.notes


def test_act_order_with_static_groups_is_carried(small_tokenizer, tmp_path):
    model = quantized(small_tokenizer, method="gptq", bits=4, group_size=32, symmetric=True, act_order=True,
                      static_groups=True)
    result = export(model, small_tokenizer, tmp_path / "m.gguf")
    assert {t.how for t in result.tensors if t.name.startswith("blk.") and len(t.shape) == 2} == {"carried"}


def test_metadata_and_vocabulary(tokenizer, tmp_path):
    model = quantized(tokenizer, bits=4, group_size=32, symmetric=True)
    export_gguf(model, tokenizer, tmp_path / "m.gguf")
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    fields = {name: field.contents() for name, field in reader.fields.items()}
    config = model.config
    expected = {"general.architecture": "llama", "llama.block_count": 2, "llama.context_length": 512,
                "llama.embedding_length": 64, "llama.feed_forward_length": 128, "llama.attention.head_count": 4,
                "llama.attention.head_count_kv": 2, "llama.rope.dimension_count": 16, "general.file_type": 2,
                "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
                "tokenizer.ggml.bos_token_id": tokenizer.bos_token_id,
                "tokenizer.ggml.eos_token_id": tokenizer.eos_token_id, "tokenizer.ggml.add_bos_token": False}
    for key, value in expected.items():
        assert fields[key] == value, key
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(config.rms_norm_eps)
    assert fields["llama.rope.freq_base"] == pytest.approx(config.rope_parameters["rope_theta"])
    # the vocabulary is the one llama.cpp's converter wrote into the embedded SmolLM2 file
    from slimlm.models.loading import embedded_gguf_path

    original = gguf.GGUFReader(str(embedded_gguf_path("smollm2-135m"))).fields
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                "tokenizer.chat_template", "tokenizer.ggml.padding_token_id", "tokenizer.ggml.unknown_token_id"):
        assert fields[key] == original[key].contents(), key
    assert "output.weight" in {t.name for t in reader.tensors}  # the tiny llama's head is untied


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_transformers_gguf_loader_reads_the_same_model(small_tokenizer, tmp_path, family):
    """An independent reader (transformers' GGUF loader, which undoes llama.cpp's q/k permutation) gets
    slimlm's logits back: exact weights through Q8_0, so only float16 rounding of the embedding differs."""
    from transformers import AutoModelForCausalLM

    model = quantized(small_tokenizer, family, bits=8, group_size=32, symmetric=True)
    export(model, small_tokenizer, tmp_path / "m.gguf", embedding_type="f32")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    probe = torch.randint(0, len(small_tokenizer), (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(probe).logits, model(probe).logits, atol=1e-4, rtol=1e-4)


def test_write_is_atomic(small_tokenizer, tmp_path, monkeypatch):
    model = quantized(small_tokenizer, bits=4, group_size=32, symmetric=True)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", broken)
    with pytest.raises(OSError):
        export(model, small_tokenizer, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_existing_file_is_kept_unless_overwrite(small_tokenizer, tmp_path):
    model = quantized(small_tokenizer, bits=4, group_size=32, symmetric=True)
    (tmp_path / "m.gguf").write_text("mine")
    with pytest.raises(SlimlmError, match="overwrite"):
        export(model, small_tokenizer, tmp_path / "m.gguf")
    export(model, small_tokenizer, tmp_path / "m.gguf", overwrite=True)
    assert gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors


def test_gguf_presets_target_the_block_formats():
    from slimlm.compress.recipe import load_recipe

    for method in ("rtn", "gptq", "awq"):
        for name, bits, symmetric in (("q4_0", 4, True), ("q4_1", 4, False), ("q8_0", 8, True)):
            stage = load_recipe(f"{method}-gguf-{name}").stages[0]
            assert (stage.method, stage.bits, stage.group_size, stage.symmetric) == (method, bits, 32, symmetric)
            if method == "rtn":
                assert stage.clip == ("signed_max" if name == "q4_0" else "minmax")
            if method == "gptq":  # llama.cpp's importance-weighted search, the Hessian diagonal as importance
                assert stage.clip == ("weighted_lsq" if name == "q4_0" else "minmax")
                assert stage.relative_dampening == (1.0 if name == "q4_0" else 0.0)


@pytest.mark.parametrize("bits, target", [(4, "Q4_0"), (5, "Q5_0")])
def test_signed_max_rtn_is_llama_cpps_own_block_quantization(small_tokenizer, tmp_path, bits, target):
    """clip "signed_max" is llama.cpp's Q4_0 / Q5_0 rule: slimlm's RTN codes and scales, carried as they are,
    give the blocks gguf-py's port of llama.cpp's reference quantizer makes from the float weights (up to
    rounding ties: llama.cpp rounds x / d + 8.5 down, slimlm rounds half to even)."""
    float_model = quantized(small_tokenizer)
    model = quantized(small_tokenizer, bits=bits, group_size=32, symmetric=True, clip="signed_max")
    export(model, small_tokenizer, tmp_path / "m.gguf", exact=True)
    written = read_back(tmp_path / "m.gguf")
    qtype = getattr(gguf.GGMLQuantizationType, target)
    for name, weight in slimlm_weights(float_model).items():
        kind, values = written[name]
        reference = gguf.quants.dequantize(gguf.quants.quantize(weight, qtype), qtype).reshape(weight.shape)
        assert kind == target
        differs = values != reference
        assert differs.mean() < 0.002, name  # ties only
        step = np.abs(reference - values)[differs]
        block_scale = np.abs(weight).reshape(-1, 32).max(axis=1) / 2 ** (bits - 1)
        assert (step <= block_scale.max() * 1.01).all(), name  # one step apart at most


def test_cli_export(tiny_dir, tmp_path, capsys):
    from slimlm.cli import main

    out = tmp_path / "m.gguf"
    # transformers loads the tiny Qwen2 directory's tokenizer as a Qwen2Tokenizer, with Qwen2's pre-tokenizer
    assert main(["export", "--model", tiny_dir, "--format", "gguf", "--out", str(out), "--type", "q8_0",
                 "--pre-tokenizer", "qwen2", "--json", str(tmp_path / "r.json")]) == 0
    assert "wrote" in capsys.readouterr().out and gguf.GGUFReader(str(out)).fields["general.architecture"]
    assert main(["export", "--model", tiny_dir, "--format", "gguf", "--out", str(tmp_path / "k.gguf"),
                 "--type", "q4_k_m"]) == 2
    assert "llama-quantize" in capsys.readouterr().err and not (tmp_path / "k.gguf").exists()
    assert main(["export", "--model", tiny_dir, "--format", "gguf", "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
