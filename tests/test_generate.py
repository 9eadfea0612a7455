"""slimlm.infer: the runner against transformers, caches, batching, sampling, streaming, bad input."""

import pytest
import torch

from slimlm.errors import SlimlmError
from slimlm.eval.perplexity import perplexity_of_windows
from slimlm.infer import (
    CacheSettings,
    ContiguousCache,
    ModelRunner,
    PagedCache,
    SamplingSettings,
    generate_ids,
    next_token_probs,
    stream_ids,
)
from slimlm.infer.engine import padded_waste_bytes
from slimlm.infer.quantized_cache import parse_kv_cache
from slimlm.infer.runner import SUPPORTED_FAMILIES
from slimlm.infer.speculative import speculative_decode
from slimlm.models.tiny import MIXED_ATTENTION, TINY_CONFIGS, tiny_model

PROMPTS = [[5, 17, 3, 99, 42], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16, 17, 200, 31]]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def _batch(prompts: list[list[int]]) -> tuple[torch.Tensor, list[int]]:
    width = max(len(p) for p in prompts)
    return torch.tensor([p + [0] * (width - len(p)) for p in prompts]), [len(p) for p in prompts]


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_runner_logits_equal_transformers(family):
    model = tiny_model(family, seed=3)
    runner = ModelRunner(model)
    cache = ContiguousCache(runner.cache_shape(), len(PROMPTS), 32)
    tokens, counts = _batch(PROMPTS)
    prefill = runner.forward(tokens, counts, cache, all_logits=True)
    step = runner.forward(torch.tensor([[1], [2], [3]]), [1, 1, 1], cache, all_logits=True)
    with torch.no_grad():
        for b, prompt in enumerate(PROMPTS):
            reference = model(torch.tensor([prompt + [b + 1]])).logits[0]
            torch.testing.assert_close(prefill[b, : len(prompt)], reference[:-1], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(step[b, 0], reference[-1], atol=1e-5, rtol=1e-5)


RUNNER_FAMILIES = [family for family in SUPPORTED_FAMILIES if family in TINY_CONFIGS]


def _mixed(family: str, seed: int = 3):
    """A 4-block model whose layers differ in attention type where the family allows it (windows of 8 tokens)."""
    return tiny_model(family, seed=seed, blocks=4, **MIXED_ATTENTION.get(family, {}))


@pytest.mark.parametrize("kind", ["contiguous", "paged"])
@pytest.mark.parametrize("family", RUNNER_FAMILIES)
def test_every_supported_family_gives_transformers_logits_past_its_windows(family, kind):
    model = _mixed(family)
    runner = ModelRunner(model)
    shape = runner.cache_shape()
    cache = (ContiguousCache(shape, len(PROMPTS), 40) if kind == "contiguous"
             else PagedCache.for_lengths(shape, [40] * len(PROMPTS), block_size=4))
    tokens, counts = _batch(PROMPTS)
    outputs = [runner.forward(tokens, counts, cache, all_logits=True)]
    steps = [[[20 + i], [30 + i], [40 + i]] for i in range(10)]  # one token at a time, past every window
    outputs += [runner.forward(torch.tensor(step), [1, 1, 1], cache, all_logits=True) for step in steps]
    with torch.no_grad():
        for b, prompt in enumerate(PROMPTS):
            sequence = prompt + [step[b][0] for step in steps]
            reference = model(torch.tensor([sequence])).logits[0]
            got = torch.cat([outputs[0][b, : len(prompt)]] + [out[b, :1] for out in outputs[1:]])
            torch.testing.assert_close(got, reference, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("family", RUNNER_FAMILIES)
def test_every_supported_family_generates_what_transformers_generates(family):
    model = _mixed(family)
    prompt = PROMPTS[2]
    reference = model.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert generate_ids(model, [prompt], 12).tokens[0] == reference[0, len(prompt):].tolist()


@pytest.mark.parametrize("family", RUNNER_FAMILIES)
def test_every_supported_family_runs_sink_and_quantized_caches(family):
    model, prompt = _mixed(family), PROMPTS[2]
    plain = generate_ids(model, [prompt], 8).tokens[0]
    roomy_sinks = CacheSettings("sinks", sink_tokens=2, window=64)  # nothing evicted: the same tokens
    assert generate_ids(model, [prompt], 8, cache=roomy_sinks).tokens[0] == plain
    assert len(generate_ids(model, [prompt], 8, cache=CacheSettings("sinks", sink_tokens=2, window=6)).tokens[0]) == 8
    windows = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(5))
    exact = perplexity_of_windows(model, windows)[0]
    for name in ("naive-8bit", "kivi-8bit"):  # the runner's chunked evaluation through a quantized cache
        spec = parse_kv_cache(name, group_size=8, residual=8)
        nll = perplexity_of_windows(model, windows, kv_cache=spec, kv_chunk=8)[0]
        assert nll == pytest.approx(exact, rel=0.02) and nll != exact, name


@pytest.mark.parametrize("family", RUNNER_FAMILIES)
def test_every_supported_family_decodes_speculatively_to_its_own_greedy_tokens(family):
    target, draft = _mixed(family), _mixed(family, seed=4)  # an unrelated draft (tiny Gemma repeats one token:
    expected = generate_ids(target, [PROMPTS[2]], 16).tokens[0]  # its drafts are all accepted)
    tokens, stats = speculative_decode(target, draft, PROMPTS[2], 16, gamma=3)
    assert tokens == expected and stats.drafted > 0


def test_unsupported_architecture_names_the_supported_ones():
    with pytest.raises(SlimlmError, match="llama, mistral, qwen2, qwen3, phi3, gemma.*falcon"):
        ModelRunner(tiny_model("falcon"))
    with pytest.raises(SlimlmError, match="post-norm"):
        ModelRunner(tiny_model("opt", do_layer_norm_before=False))


def test_paged_and_contiguous_caches_give_identical_logits(llama):
    runner = ModelRunner(llama)
    contiguous = ContiguousCache(runner.cache_shape(), 3, 40)
    paged = PagedCache.for_lengths(runner.cache_shape(), [40, 40, 40], block_size=4)
    tokens, counts = _batch(PROMPTS)
    steps = [(tokens, counts)] + [(torch.tensor([[i], [i + 1], [i + 2]]), [1, 1, 1]) for i in range(6)]
    steps.append((torch.tensor([[4, 5, 6], [7, 0, 0], [8, 9, 0]]), [3, 1, 2]))  # uneven multi-token step
    for step_tokens, step_counts in steps:
        expected = runner.forward(step_tokens, step_counts, contiguous, all_logits=True)
        got = runner.forward(step_tokens, step_counts, paged, all_logits=True)
        for b, count in enumerate(step_counts):
            torch.testing.assert_close(got[b, :count], expected[b, :count], atol=1e-6, rtol=1e-6)
    assert paged.lengths == contiguous.lengths


def test_paged_cache_wastes_less_than_padding_and_frees_blocks(llama):
    prompts = [[1] * 3, [2] * 40, [3] * 17, [4] * 9]
    contiguous = generate_ids(llama, prompts, 5)
    paged = generate_ids(llama, prompts, 5, cache=CacheSettings("paged", block_size=8))
    assert paged.tokens == contiguous.tokens
    token_bytes = paged.stats.kv_bytes_per_token
    lengths = [len(p) + 4 for p in prompts]  # the last token is sampled, never fed
    assert contiguous.stats.kv_bytes_wasted >= padded_waste_bytes(lengths, token_bytes) > 0
    assert paged.stats.kv_bytes_wasted < len(prompts) * 8 * token_bytes  # under one block per sequence
    assert paged.stats.kv_bytes_wasted < contiguous.stats.kv_bytes_wasted / 4
    assert paged.stats.kv_bytes_held == paged.stats.kv_bytes_wasted + sum(lengths) * token_bytes

    runner = ModelRunner(llama)
    cache = PagedCache.for_lengths(runner.cache_shape(), [20, 20], block_size=4)
    runner.forward(torch.tensor([[1] * 9, [2] * 9]), [9, 5], cache)
    assert [len(t) for t in cache.block_tables] == [3, 2] and len(cache.free_blocks) == 10 - 5
    cache.truncate(0, 4)
    assert len(cache.block_tables[0]) == 1
    cache.release(1)
    assert cache.block_tables[1] == [] and len(cache.free_blocks) == 9 and cache.bytes_held() == 4 * 512


@pytest.mark.parametrize("kind", ["contiguous", "paged"])
def test_batch_output_equals_one_by_one_and_transformers(llama, kind):
    settings = CacheSettings(kind, block_size=4)
    batched = generate_ids(llama, PROMPTS, 8, cache=settings).tokens
    for prompt, tokens in zip(PROMPTS, batched):
        assert generate_ids(llama, [prompt], 8, cache=settings).tokens[0] == tokens
        reference = llama.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False)
        assert reference[0, len(prompt):].tolist() == tokens


def test_eos_stops_one_sequence_and_the_others_continue(llama):
    free = generate_ids(llama, PROMPTS, 6).tokens
    stop = free[1][2]
    stopped = generate_ids(llama, PROMPTS, 6, eos_token_ids=[stop], cache=CacheSettings("paged", block_size=4)).tokens
    assert stopped[1] == free[1][: free[1].index(stop) + 1]
    for b in (0, 2):
        expected = free[b][: free[b].index(stop) + 1] if stop in free[b] else free[b]
        assert stopped[b] == expected


def test_sampling_is_seeded_and_filters_behave(llama):
    settings = SamplingSettings(temperature=1.0, top_k=20, top_p=0.9, seed=7)
    first = generate_ids(llama, PROMPTS, 8, sampling=settings).tokens
    assert generate_ids(llama, PROMPTS, 8, sampling=settings).tokens == first
    assert generate_ids(llama, PROMPTS, 8, sampling=SamplingSettings(1.0, 20, 0.9, seed=8)).tokens != first
    greedy = generate_ids(llama, PROMPTS, 8).tokens
    assert generate_ids(llama, PROMPTS, 8, sampling=SamplingSettings(1.0, top_k=1, seed=3)).tokens == greedy

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    top2 = next_token_probs(logits, SamplingSettings(temperature=1.0, top_k=2))
    assert torch.allclose(top2, torch.tensor([[0.7311, 0.2689, 0.0, 0.0]]), atol=1e-4)
    softmax = torch.softmax(logits, -1)  # 0.644, 0.237, 0.087, 0.032
    nucleus = next_token_probs(logits, SamplingSettings(temperature=1.0, top_p=0.85))
    assert torch.allclose(nucleus, torch.cat([softmax[:, :2] / softmax[:, :2].sum(), torch.zeros(1, 2)], 1))
    hot = next_token_probs(logits, SamplingSettings(temperature=0.5))
    assert torch.allclose(hot, torch.softmax(logits / 0.5, -1))


def test_stream_yields_tokens_step_by_step(llama):
    events = list(stream_ids(llama, PROMPTS, 4))
    assert [e.step for e in events] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert [[e.token for e in events if e.sequence == b] for b in range(3)] == generate_ids(llama, PROMPTS, 4).tokens
    assert generate_ids(llama, PROMPTS, 0).tokens == [[], [], []]


@pytest.mark.parametrize("call, message", [
    (lambda m: generate_ids(m, [[1, 2], []], 4), "prompt 1 is empty"),
    (lambda m: generate_ids(m, [[1, 2]], -1), "max_new_tokens must be an integer >= 0"),
    (lambda m: SamplingSettings(temperature=-0.5), "temperature must be >= 0"),
    (lambda m: SamplingSettings(temperature=1.0, top_p=0.0), r"top_p must be in \(0, 1\]"),
    (lambda m: SamplingSettings(temperature=1.0, top_p=1.5), r"top_p must be in \(0, 1\]"),
    (lambda m: SamplingSettings(temperature=1.0, top_k=0), "top_k must be a positive integer"),
    (lambda m: CacheSettings("sinks", window=0), "window must be at least 1"),
    (lambda m: CacheSettings("sinks", sink_tokens=-1), "sink tokens must be >= 0"),
    (lambda m: CacheSettings("ring"), "unknown cache 'ring'"),
])
def test_bad_input_is_a_clear_error(llama, call, message):
    with pytest.raises(SlimlmError, match=message):
        call(llama)


def test_full_contiguous_cache_and_empty_pool_are_errors(llama):
    runner = ModelRunner(llama)
    with pytest.raises(SlimlmError, match="contiguous KV cache full"):
        runner.forward(torch.tensor([[1] * 5]), [5], ContiguousCache(runner.cache_shape(), 1, 4))
    with pytest.raises(SlimlmError, match="out of blocks"):
        runner.forward(torch.tensor([[1] * 5]), [5], PagedCache(runner.cache_shape(), 1, num_blocks=1, block_size=4))


@pytest.mark.parametrize("recipe", ["rtn-w4g32", "magnitude-2of4", "drop-layers-2", "slicegpt-per-block-25",
                                    "flap-20-adaptive"])
def test_compressed_models_run_through_the_runner(recipe):
    """Quantized and sparse linears are called as modules; SliceGPT's shortcuts and per-block widths are honoured."""
    import slimlm
    from slimlm.prune.sparse_linear import sparsify_model_

    model = tiny_model("llama", blocks=4)
    calibration = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    slimlm.compress(model, recipe, calibration=calibration)
    if recipe.startswith("magnitude"):
        assert sparsify_model_(model, (2, 4)) > 0
    runner = ModelRunner(model, fast_kernels=False)  # exact: bf16 decode kernels are tested in test_deploy_kernels
    tokens, counts = _batch(PROMPTS)
    logits = runner.forward(tokens, counts, ContiguousCache(runner.cache_shape(), 3, 16), all_logits=True)
    with torch.no_grad():
        for b, prompt in enumerate(PROMPTS):
            torch.testing.assert_close(logits[b, : len(prompt)], model(torch.tensor([prompt])).logits[0],
                                       atol=1e-5, rtol=1e-5)
    generated = generate_ids(runner, PROMPTS, 3, cache=CacheSettings("paged", block_size=4)).tokens
    assert [len(t) for t in generated] == [3] * 3


@pytest.mark.parametrize("family", ["gemma3_text", "phi3", "gpt2", "gpt_neox"])
@pytest.mark.parametrize("recipe", ["gptq-w4g64", "sparsegpt-2of4"])
def test_compressed_models_of_other_families_run_through_the_runner(family, recipe):
    import slimlm

    model = _mixed(family)
    calibration = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    slimlm.compress(model, recipe, calibration=calibration)
    assert any(getattr(m, "is_compressed_linear", False) for m in model.modules()) or recipe.startswith("sparse")
    prompt = PROMPTS[2]
    with torch.no_grad():
        reference = model.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert generate_ids(model, [prompt], 8).tokens[0] == reference[0, len(prompt):].tolist()


def test_streamed_text_flushes_a_character_held_back_at_the_end():
    """A byte-level tokenizer can end on half a UTF-8 character: the held-back text still comes out."""
    from slimlm.infer.engine import TextDeltas

    class Bytes:
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", errors="replace")

    deltas = TextDeltas(Bytes())
    pieces = [deltas.add(token) for token in "ab".encode()] + [deltas.add("é".encode()[0])]
    assert pieces == ["a", "b", ""]  # the first byte of é waits for the second
    assert deltas.rest() == "\ufffd"  # generation stopped there: emitted rather than lost
