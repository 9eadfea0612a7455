import math

import pytest
import torch
import torch.nn.functional as F

from slimlm.data.calibration import added_bos
from slimlm.data.corpora import Corpus
from slimlm.errors import SlimlmError
from slimlm.eval.kl import kl_divergence, token_kl
from slimlm.eval.perplexity import corpus_windows, perplexity, token_windows
from slimlm.models.tiny import tiny_model
from tests.helpers import small_bpe_tokenizer


@pytest.fixture(scope="module")
def text_corpus():
    return Corpus("toy", "eval", ("The quick brown fox jumps over the lazy dog. " * 40, "Second document " * 30), "test")


def straight_line_ppl(model, tokenizer, text, seqlen):
    """The GPTQ reference loop, written out independently."""
    ids = tokenizer(text, return_tensors="pt").input_ids
    windows = ids.numel() // seqlen
    nlls = []
    for i in range(windows):
        batch = ids[:, i * seqlen : (i + 1) * seqlen]
        with torch.no_grad():
            logits = model(batch).logits
        loss = F.cross_entropy(logits[0, :-1].float(), batch[0, 1:])
        nlls.append(loss.float() * seqlen)
    return torch.exp(torch.stack(nlls).sum() / (windows * seqlen)).item()


def test_token_windows_drop_the_remainder():
    windows = token_windows(torch.arange(10), seqlen=4)
    assert windows.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert token_windows(torch.arange(10), seqlen=4, max_windows=1).shape == (1, 4)
    with pytest.raises(SlimlmError, match="fewer than one window"):
        token_windows(torch.arange(3), seqlen=4)
    with pytest.raises(SlimlmError, match="max_windows"):
        token_windows(torch.arange(10), seqlen=4, max_windows=0)


def test_perplexity_matches_the_reference_loop(text_corpus, tokenizer):
    model = tiny_model("llama", vocab_size=len(tokenizer))
    result = perplexity(model, tokenizer, text_corpus, seqlen=32)
    assert result.windows == result.total_windows > 3
    assert result.ppl == pytest.approx(straight_line_ppl(model, tokenizer, text_corpus.text, 32), rel=1e-5)
    assert result.tokens_scored == result.windows * 31
    assert "GPTQ" in result.protocol


def test_kl_of_a_model_from_itself_is_zero(text_corpus, tokenizer):
    model = tiny_model("qwen2", vocab_size=len(tokenizer))
    result = kl_divergence(model, model, tokenizer, text_corpus, seqlen=32, max_windows=2)
    assert result.kl_mean == pytest.approx(0.0, abs=1e-6)
    assert result.top1_agreement == 1.0
    assert result.ppl == pytest.approx(result.ppl_reference)


def test_kl_grows_with_the_perturbation(text_corpus, tokenizer):
    reference = tiny_model("llama", vocab_size=len(tokenizer))
    kls = []
    for noise in (0.01, 0.1):
        model = tiny_model("llama", vocab_size=len(tokenizer))
        torch.manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(noise * torch.randn_like(p))
        kls.append(kl_divergence(model, reference, tokenizer, text_corpus, seqlen=32, max_windows=2).kl_mean)
    assert 0 < kls[0] < kls[1]


def test_token_kl_matches_the_definition():
    torch.manual_seed(0)
    p_logits, q_logits = torch.randn(5, 11), torch.randn(5, 11)
    p, q = p_logits.softmax(-1), q_logits.softmax(-1)
    expected = (p * (p.log() - q.log())).sum(-1)
    assert torch.allclose(token_kl(p_logits, q_logits), expected, atol=1e-6)
    assert torch.allclose(token_kl(p_logits, q_logits), F.kl_div(q.log(), p, reduction="none").sum(-1), atol=1e-6)


def test_random_model_of_the_real_shape_has_perplexity_near_vocabulary_size(real_model, tokenizer):
    """A model that knows nothing predicts ~uniformly: ppl close to the vocabulary size (49152)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    random_model = AutoModelForCausalLM.from_config(real_model.model.config).eval()
    result = perplexity(random_model, tokenizer, "pydoc", seqlen=256, max_windows=2)
    vocab = real_model.model.config.vocab_size
    assert 0.5 * vocab < result.ppl < 2 * vocab
    trained = perplexity(real_model.model, tokenizer, "pydoc", seqlen=256, max_windows=2)
    assert trained.ppl < 100 < result.ppl
    assert math.isfinite(trained.nll)


def test_bos_follows_the_tokenizer(text_corpus):
    plain, with_bos = small_bpe_tokenizer(), small_bpe_tokenizer(adds_bos=True)
    assert added_bos(plain) is None and added_bos(with_bos) == 1
    stream = plain(text_corpus.text, return_tensors="pt").input_ids[0]
    assert with_bos(text_corpus.text, return_tensors="pt").input_ids[0].tolist() == [1, *stream.tolist()]
    windows, total, bos = corpus_windows(plain, text_corpus, 32, max_windows=3)
    assert not bos and windows.tolist() == token_windows(stream, 32, 3).tolist() and total == len(stream) // 32
    windows, total, bos = corpus_windows(with_bos, text_corpus, 32, max_windows=3)
    assert bos and total == len(stream) // 31
    assert windows[:, 0].tolist() == [1, 1, 1]  # the BOS starts every window, not only the corpus
    assert windows[:, 1:].tolist() == token_windows(stream, 31, 3).tolist()


def test_perplexity_with_bos_scores_each_window_after_the_bos(text_corpus):
    tokenizer = small_bpe_tokenizer(adds_bos=True)
    model = tiny_model("llama", vocab_size=len(tokenizer))
    result = perplexity(model, tokenizer, text_corpus, seqlen=32, max_windows=4)
    stream = tokenizer(text_corpus.text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    nll = []
    for i in range(4):  # written out: [BOS] + 31 tokens, the 31 tokens predicted
        window = torch.cat([torch.tensor([1]), stream[i * 31 : (i + 1) * 31]])
        with torch.no_grad():
            logits = model(window[None]).logits[0]
        nll.append(F.cross_entropy(logits[:-1], window[1:], reduction="sum"))
    assert result.bos and result.tokens_scored == 4 * 31
    assert result.ppl == pytest.approx(math.exp(float(sum(nll)) / (4 * 31)), rel=1e-5)
    plain = perplexity(model, small_bpe_tokenizer(), text_corpus, seqlen=32, max_windows=4)
    assert not plain.bos and plain.ppl != pytest.approx(result.ppl, rel=1e-3)
    kl = kl_divergence(model, model, tokenizer, text_corpus, seqlen=32, max_windows=2)
    assert kl.bos and kl.ppl == pytest.approx(perplexity(model, tokenizer, text_corpus, seqlen=32, max_windows=2).ppl)
