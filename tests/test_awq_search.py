"""AWQ's faster search: the Gram-matrix error, the search segments, the clipping samples taken during the pass."""

import torch

from slimlm.compress import compress
from slimlm.models.tiny import tiny_model
from slimlm.quant import awq
from slimlm.quant.grid import fake_quantize_groups

CALIBRATION = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))


def awq_recipe(**settings):
    return {"stages": [{"method": "awq", "bits": 3, "group_size": 32, **settings}], "calibration": {"batch_size": 4}}


def test_the_gram_search_picks_what_the_search_on_the_tokens_picks():
    torch.manual_seed(0)
    x = torch.randn(3, 50, 64) * torch.linspace(0.1, 4, 64)  # uneven channels: alpha matters
    weight = torch.randn(48, 64)
    linear = torch.nn.Linear(64, 48, bias=False)
    linear.weight.data.copy_(weight)
    mean_abs = x.abs().reshape(-1, 64).mean(0)

    def pseudo_quantize(w):
        return fake_quantize_groups(w, 3, 32, False)

    on_tokens = awq.search_scales(lambda _i, t: linear(t), [x], {"l": weight}, {"l": linear}, {"l"}, pseudo_quantize,
                                  20, mean_abs)
    rows = x.reshape(-1, 64)
    on_gram = awq.search_scales_gram(mean_abs, rows.T @ rows / len(rows), {"l": weight}, {"l"}, pseudo_quantize, 20)
    assert torch.equal(on_tokens, on_gram)


def test_searching_on_every_segment_and_on_a_subset_of_them(monkeypatch):
    default, every = tiny_model("llama"), tiny_model("llama")
    compress(default, awq_recipe(search_samples=None), calibration=CALIBRATION)
    compress(every, awq_recipe(search_samples=8), calibration=CALIBRATION)
    for a, b in zip(default.buffers(), every.buffers()):
        assert torch.equal(a, b)
    seen = []
    search = awq.search_scales
    monkeypatch.setattr(awq, "search_scales", lambda inspect, inputs, *rest: seen.append(
        [tuple(x.shape) for x in inputs]) or search(inspect, inputs, *rest))
    subset = tiny_model("llama")
    compress(subset, awq_recipe(search_samples=5), calibration=CALIBRATION)  # one batch of 4, one segment of the next
    assert seen and all(shapes == [(4, 32, 64), (1, 32, 64)] for shapes in seen)
    assert any(not torch.equal(a, b) for a, b in zip(subset.buffers(), every.buffers()))


def test_the_clipping_samples_are_every_stride_th_token_of_all_batches():
    batches = [torch.randn(4, 10, 8) for _ in range(3)]
    statistics = awq._InputStatistics(8, torch.device("cpu"), gram=False, stride=7, batch=[0, 4])
    for x in batches:
        statistics.add_batch(x)
    expected = torch.cat([x.reshape(-1, 8) for x in batches])[::7]
    assert torch.equal(statistics.samples(), expected)


def test_the_layer_objective_searches_every_group_from_gram_matrices(monkeypatch):
    module_searches = []
    search = awq.search_scales
    monkeypatch.setattr(awq, "search_scales", lambda *a: module_searches.append(1) or search(*a))
    model, reference = tiny_model("llama"), tiny_model("llama")
    compress(model, awq_recipe(objective="layer"), calibration=CALIBRATION)
    assert not module_searches  # no attention or MLP re-runs
    with torch.no_grad():
        error = (model(CALIBRATION).logits - reference(CALIBRATION).logits).abs().mean()
    assert 0 < error < 0.5 * reference(CALIBRATION).logits.abs().mean()
