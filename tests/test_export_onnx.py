"""ONNX Runtime export: slimlm's codes carried into MatMulNBits, run by ONNX Runtime and onnxruntime-genai.

The initialisers are read back with `onnx` and unpacked here, independently of the exporter (MatMulNBits'
layout: (N, k_blocks, block * bits / 8) uint8, low bits first), and compared with slimlm's own codes,
scales and zero points. ONNX Runtime's logits are compared with slimlm's reference forward of the same
model: at accuracy_level 0 (float32 arithmetic) to 1e-4, at the default accuracy_level 4 (int8 activations
inside MatMulNBits) to 3% of the logits' range. onnxruntime-genai's greedy tokens must equal slimlm's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from slimlm.compress import compress
from slimlm.errors import SlimlmError
from slimlm.export.onnx import export_onnx
from slimlm.models.tiny import tiny_model

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
og = pytest.importorskip("onnxruntime_genai")
pytestmark = pytest.mark.usefixtures("one_thread")
CALIBRATION = torch.randint(0, 262, (4, 32), generator=torch.Generator().manual_seed(0))
PROMPT = torch.randint(3, 262, (1, 24), generator=torch.Generator().manual_seed(1))
HEAD8 = {"method": "quantize_head", "bits": 8}
# (family, recipe stages, tie the head to the embedding first)
CASES = {
    "llama-rtn-w4g32-asym-head8": ("llama", [HEAD8, {"method": "rtn", "bits": 4, "group_size": 32}], False),
    "qwen2-gptq-w4g16-sym-actorder": ("qwen2", [{"method": "gptq", "bits": 4, "group_size": 16, "symmetric": True,
                                                 "act_order": True}], False),
    "mistral-rtn-w8ch-sym-tied": ("mistral", [{"method": "rtn", "bits": 8, "group_size": "channel",
                                               "symmetric": True}], True),
    "qwen2-rtn-w2g32-asym-tied-head8": ("qwen2", [HEAD8, {"method": "rtn", "bits": 2, "group_size": 32}], True),
}


@pytest.fixture(scope="module")
def small_tokenizer():
    """A byte-level BPE tokenizer of 262 tokens (fast to save and load)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    vocab.update({char: index + 3 for index, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))})
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")


def build(family: str, stages: list | None, tied: bool = False) -> nn.Module:
    model = tiny_model(family, vocab_size=262)
    if tied:
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    if stages:
        compress(model, {"stages": stages}, calibration=CALIBRATION)
    return model


@pytest.fixture(scope="module")
def exported(small_tokenizer, tmp_path_factory):
    """{case: (model, directory)} exported at accuracy_level 0 (float32 arithmetic)."""
    out = {}
    for case, (family, stages, tied) in CASES.items():
        model = build(family, stages, tied)
        directory = tmp_path_factory.mktemp("onnx") / case
        export_onnx(model, small_tokenizer, directory, accuracy_level=0)
        out[case] = (model, directory)
    return out


def session(directory):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(directory / "model.onnx"), options, providers=["CPUExecutionProvider"])


def run(sess, ids: np.ndarray, past: dict | None = None, total: int | None = None) -> dict:
    """One forward: logits and present KV, from `past` (None: an empty cache)."""
    feed = {"input_ids": ids, "attention_mask": np.ones((1, total or ids.shape[1]), np.int64)}
    names = [o.name for o in sess.get_outputs()]
    for item in sess.get_inputs():
        if item.name.startswith("past_key_values."):
            index, kind = item.name.split(".")[1:]
            feed[item.name] = (np.zeros((1, item.shape[1], 0, item.shape[3]), np.float32) if past is None
                               else past[f"present.{index}.{kind}"])
    return dict(zip(names, sess.run(None, feed)))


def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """MatMulNBits' bit packing read independently: value i of a byte sits at bits [bits*i, bits*(i+1))."""
    per = 8 // bits
    return np.stack([(packed >> (bits * i)) & ((1 << bits) - 1) for i in range(per)], axis=-1).reshape(
        *packed.shape[:-1], -1)


def matmulnbits(directory) -> dict[str, dict]:
    """{B initialiser prefix: {attributes, B, scales, zero_points, perm}} of every MatMulNBits node."""
    model = onnx.load(str(directory / "model.onnx"))
    values = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    gathers = {n.output[0]: values[n.input[1]] for n in model.graph.node
               if n.op_type == "Gather" and n.input[1] in values and n.input[1].endswith(".input_order")}
    out = {}
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        inputs = list(node.input) + [""] * 6
        out[inputs[1].removesuffix(".MatMulNBits.B")] = {
            **attributes, "B": values[inputs[1]], "scales": values[inputs[2]],
            "zero_points": values.get(inputs[3]), "bias": values.get(inputs[5]), "perm": gathers.get(inputs[0])}
    return out


def slimlm_linears(model) -> dict[str, nn.Module]:
    linears = {f"model.layers.{i}.{name}": block.get_submodule(name) for i, block in enumerate(model.model.layers)
               for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    head = model.get_output_embeddings()
    if hasattr(head, "codes"):
        linears["lm_head"] = head
    return linears


@pytest.mark.parametrize("case", list(CASES))
def test_codes_scales_and_zero_points_carried_exactly(exported, case):
    model, directory = exported[case]
    nodes = matmulnbits(directory)
    linears = slimlm_linears(model)
    covered = set()
    for prefix, node in nodes.items():
        # q/k/v share one node (rows stacked in that order), every other linear has its own
        sources = ([prefix.replace("qkv_proj", name) for name in ("q_proj", "k_proj", "v_proj")]
                   if prefix.endswith("qkv_proj") else [prefix])
        bits, block, K = node["bits"], node["block_size"], node["K"]
        codes = unpack(node["B"], bits).reshape(node["N"], -1)[:, :K].astype(np.int32)
        k_blocks = node["B"].shape[1]
        zeros = (np.full((node["N"], k_blocks), 2 ** (bits - 1)) if node["zero_points"] is None
                 else unpack(node["zero_points"], bits)[:, :k_blocks].astype(np.int32))
        row = 0
        for source in sources:
            layer = linears[source]
            rows = slice(row, row + layer.out_features)
            row += layer.out_features
            expected = layer.codes().numpy()
            group = (np.arange(K) // layer.group_size if layer.group_size else np.zeros(K, dtype=np.int64))
            if layer.g_idx is not None:
                group = layer.g_idx.long().numpy()
            if node["perm"] is not None:  # act-order: the input columns sorted by group, the same order applied
                expected, group = expected[:, node["perm"]], group[node["perm"]]
                assert (np.diff(group) >= 0).all()
            assert layer.bits == bits and np.array_equal(codes[rows], expected), source
            block_group = group[::block]
            assert np.array_equal(node["scales"][rows], layer.scale.float().numpy()[:, block_group]), source
            zero = (layer.zero.numpy() if layer.zero is not None else np.full_like(layer.scale.numpy(), 2 ** (bits - 1)))
            assert np.array_equal(zeros[rows], zero[:, block_group]), source
            weight = (codes[rows] - zeros[rows].repeat(block, 1)[:, :K]) * node["scales"][rows].repeat(block, 1)[:, :K]
            reference = layer.dequantize_weight().numpy()
            if node["perm"] is not None:
                reference = reference[:, node["perm"]]
            assert np.array_equal(weight.astype(np.float32), reference), source
            covered.add(source)
    assert covered == set(linears)
    assert any(node["perm"] is not None for node in nodes.values()) == ("actorder" in case)
    if "tied" in case and "head8" not in case:  # the head multiplies by the embedding initialiser itself
        graph = onnx.load(str(directory / "model.onnx"), load_external_data=False).graph
        head = next(n for n in graph.node if n.output[0] == "logits")
        assert head.op_type == "FusedMatMul" and head.input[1] == "model.embed_tokens.weight"


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_slimlm_reference(exported, case):
    model, directory = exported[case]
    sess = session(directory)
    with torch.no_grad():
        reference = model(PROMPT).logits.numpy()
    whole = run(sess, PROMPT.numpy())["logits"]
    assert np.abs(whole - reference).max() < 1e-4
    # the KV cache: a 16-token prompt, then one token at a time
    step = run(sess, PROMPT[:, :16].numpy())
    logits = [step["logits"]]
    for t in range(16, PROMPT.shape[1]):
        step = run(sess, PROMPT[:, t: t + 1].numpy(), step, total=t + 1)
        logits.append(step["logits"])
    assert np.abs(np.concatenate(logits, axis=1) - reference).max() < 1e-4


@pytest.mark.parametrize("case", ["llama-rtn-w4g32-asym-head8", "qwen2-gptq-w4g16-sym-actorder"])
def test_genai_greedy_tokens_equal_slimlm(exported, case):
    from slimlm.infer import generate_ids
    from slimlm.infer.runner import ModelRunner

    model, directory = exported[case]
    prompt = PROMPT[0].tolist()
    expected = generate_ids(ModelRunner(model, fast_kernels=False), [prompt], 16).tokens[0]
    genai = og.Model(str(directory))
    params = og.GeneratorParams(genai)
    params.set_search_options(max_length=len(prompt) + 16, do_sample=False)
    generator = og.Generator(genai, params)
    generator.append_tokens(prompt)
    tokens = []
    while len(tokens) < 16 and not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    assert tokens == expected[: len(tokens)] and len(tokens) >= 8  # genai stops early only at end-of-sequence


def test_default_accuracy_level_is_int8_activations(small_tokenizer, tmp_path):
    """accuracy_level 4 (the default): the same initialisers, ONNX Runtime's int8-activation arithmetic."""
    model = build(*CASES["llama-rtn-w4g32-asym-head8"])
    result = export_onnx(model, small_tokenizer, tmp_path / "m")
    assert result.accuracy_level == 4 and result.summary()["carried_max_abs_error"] == 0.0
    assert {node["accuracy_level"] for node in matmulnbits(tmp_path / "m").values()} == {4}
    with torch.no_grad():
        reference = model(PROMPT).logits.numpy()
    logits = run(session(tmp_path / "m"), PROMPT.numpy())["logits"]
    assert np.abs(logits - reference).max() < 0.03 * (reference.max() - reference.min())
    assert (logits.argmax(-1) == reference.argmax(-1)).mean() > 0.9


def test_widen_bits_carries_three_bit_codes_exactly(small_tokenizer, tmp_path):
    for symmetric in (False, True):
        model = build("llama", [{"method": "rtn", "bits": 3, "group_size": 32, "symmetric": symmetric}])
        with pytest.raises(SlimlmError, match="2, 4 and 8 bits only.*widen_bits"):
            export_onnx(model, small_tokenizer, tmp_path / f"no-{symmetric}")
        assert not (tmp_path / f"no-{symmetric}").exists()
        result = export_onnx(model, small_tokenizer, tmp_path / f"w-{symmetric}", accuracy_level=0, widen_bits=True)
        carried = [t for t in result.tensors if t.how == "carried"]
        assert {(t.bits, t.stored_bits) for t in carried} == {(3, 4)}
        assert all(t.max_abs_error == 0.0 for t in carried)
        with torch.no_grad():
            reference = model(PROMPT).logits.numpy()
        assert np.abs(run(session(tmp_path / f"w-{symmetric}"), PROMPT.numpy())["logits"] - reference).max() < 1e-4


def test_w8a8_weights_with_drop_activation_quantization(small_tokenizer, tmp_path):
    model = build("llama", [{"method": "rtn", "bits": 8, "group_size": "channel", "symmetric": True,
                             "activations": {"bits": 8, "granularity": "per_token", "symmetric": True}}])
    with pytest.raises(SlimlmError, match="quantizes its activations.*drop_activation_quantization"):
        export_onnx(model, small_tokenizer, tmp_path / "refused")
    result = export_onnx(model, small_tokenizer, tmp_path / "m", accuracy_level=0, drop_activation_quantization=True)
    assert result.summary()["carried"] == 14 and result.summary()["carried_max_abs_error"] == 0.0
    assert any("drop_activation_quantization" in note for note in result.notes)


def _unknown_kind_model(monkeypatch):
    from slimlm.core import registry

    class Mystery(nn.Linear):
        layer_kind = "onnx_test_mystery"

        def meta(self):
            return {}

        @classmethod
        def from_meta(cls, meta, dtype):
            return cls(1, 1)

    monkeypatch.setitem(registry._layers, "onnx_test_mystery", Mystery)
    model = build("llama", [{"method": "rtn", "bits": 4, "group_size": 32}])
    model.model.layers[1].mlp.up_proj = Mystery(64, 128, bias=False)
    return model


def _scrambled_act_order_model():
    model = build("llama", [{"method": "gptq", "bits": 4, "group_size": 16, "act_order": True}])
    layer = model.model.layers[0].self_attn.o_proj
    layer.g_idx = torch.randint(0, layer.n_groups, (layer.in_features,), generator=torch.Generator().manual_seed(3),
                                dtype=torch.int32)  # uneven groups: no permutation makes them whole blocks
    return model


@pytest.mark.parametrize("make, message", [
    (lambda mp: build("llama", [{"method": "rtn", "bits": 4, "group_size": 8}]),
     "group 8: MatMulNBits blocks are powers of two of at least 16 columns"),
    (lambda mp: build("llama", [{"method": "rtn", "bits": 4, "group_size": 32, "fmt": "fp4_e2m1",
                                  "symmetric": True}]),
     "symmetric fp4_e2m1, group 32: MatMulNBits holds integer grids only"),
    (lambda mp: _scrambled_act_order_model(), ("o_proj: 4-bit asymmetric int, group 16, act-order: its act-order "
                                              "groups, sorted, do not fill whole blocks.*static_groups")),
    (_unknown_kind_model, "up_proj: layer kind 'onnx_test_mystery' has no ONNX form"),
    (lambda mp: build("opt", None), "ONNX export supports the llama, mistral, qwen2 families"),
])
def test_refused_before_anything_is_written(small_tokenizer, tmp_path, monkeypatch, make, message):
    model = make(monkeypatch)
    with pytest.raises(SlimlmError, match=message):
        export_onnx(model, small_tokenizer, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # no directory, no temporary left behind


def test_existing_output_and_overwrite(small_tokenizer, tmp_path):
    model = build("llama", [{"method": "rtn", "bits": 4, "group_size": 32}])
    export_onnx(model, small_tokenizer, tmp_path / "m")
    with pytest.raises(SlimlmError, match="exists"):
        export_onnx(model, small_tokenizer, tmp_path / "m")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(SlimlmError, match="not an ONNX export directory"):
        export_onnx(model, small_tokenizer, tmp_path / "mine", overwrite=True)
    result = export_onnx(model, small_tokenizer, tmp_path / "m", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "mine"]
    assert result.files["model.onnx.data"] > 0 and (tmp_path / "m" / "genai_config.json").exists()


def test_cli_export_onnx(small_tokenizer, tmp_path, capsys):
    from slimlm.cli import main
    from slimlm.export.native import save

    model = build("qwen2", [HEAD8, {"method": "rtn", "bits": 4, "group_size": 32}])
    save(model, tmp_path / "model", small_tokenizer)
    out = tmp_path / "onnx"
    assert main(["export", "--model", str(tmp_path / "model"), "--format", "onnx", "--out", str(out),
                 "--json", str(tmp_path / "r.json")]) == 0
    assert "wrote" in capsys.readouterr().out and (out / "model.onnx").exists()
    assert main(["export", "--model", str(tmp_path / "model"), "--format", "onnx", "--out", str(tmp_path / "x"),
                 "--type", "q4_0"]) == 2
    assert "applies to --format gguf only" in capsys.readouterr().err and not (tmp_path / "x").exists()
