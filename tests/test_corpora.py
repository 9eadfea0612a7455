import pytest
import torch

from slimlm.data.calibration import calibration_samples, tokenize_corpus
from slimlm.data.corpora import CORPORA, load_corpus, wikitext_rows
from slimlm.errors import SlimlmError


def test_wikitext_rows_follow_the_hf_dataset():
    assert wikitext_rows(" = A = \n \n text\n") == [" = A = \n", "", " text\n"]


@pytest.mark.parametrize("name", ["wikitext2", "ptb", "c4"])
def test_eval_and_calibration_splits_share_no_text(name, data_dir):
    evaluation = load_corpus(name, "eval", data_dir)
    calibration = load_corpus(name, "calibration", data_dir)
    assert evaluation.source != calibration.source
    long_eval = {doc for doc in evaluation.documents if len(doc) > 80}
    long_calibration = {doc for doc in calibration.documents if len(doc) > 80}
    assert long_eval and long_calibration
    # Disjoint parts of each dataset; PTB's Wall Street Journal repeats a few boilerplate sentences
    # (money-market tables) across its official splits, so allow that and nothing more.
    assert len(long_eval & long_calibration) <= 0.01 * len(long_eval)


def test_corpus_sizes(data_dir):
    assert len(load_corpus("wikitext2", "eval", data_dir).documents) == 4358
    assert len(load_corpus("ptb", "eval", data_dir).documents) == 3761
    assert len(load_corpus("c4", "eval", data_dir).documents) == 1000
    assert load_corpus("c4", "eval", data_dir).source.endswith("docs 1000-1999")


def test_pydoc_needs_no_data_and_splits_topics():
    evaluation, calibration = load_corpus("pydoc", "eval"), load_corpus("pydoc", "calibration")
    assert len(evaluation.text) > 100_000 and len(calibration.text) > 100_000
    assert not set(evaluation.documents) & set(calibration.documents)


def test_user_text_and_jsonl_files(tmp_path):
    text = tmp_path / "mine.txt"
    text.write_text("hello world")
    assert load_corpus(str(text)).documents == ("hello world",)
    jsonl = tmp_path / "mine.jsonl"
    jsonl.write_text('{"text": "a"}\n{"text": "b"}\n')
    assert load_corpus(str(jsonl)).text == "a\n\nb"
    jsonl.write_text('{"body": "a"}\n')
    with pytest.raises(SlimlmError, match='"text" field'):
        load_corpus(str(jsonl))


def test_errors_name_the_problem(tmp_path, monkeypatch):
    with pytest.raises(SlimlmError, match="unknown corpus 'wiki'"):
        load_corpus("wiki")
    with pytest.raises(SlimlmError, match="data directory not found"):
        load_corpus("wikitext2", data_dir=tmp_path / "nope")
    with pytest.raises(SlimlmError, match="data file missing"):
        load_corpus("ptb", data_dir=tmp_path)
    monkeypatch.delenv("SLIMLM_DATA", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(SlimlmError, match="needs a data directory"):
        load_corpus("c4")
    assert set(CORPORA) == {"wikitext2", "ptb", "c4", "pydoc"}


def test_calibration_samples_are_seeded_and_from_the_calibration_split(tokenizer):
    first = calibration_samples(tokenizer, "pydoc", num_samples=8, seqlen=64, seed=3)
    again = calibration_samples(tokenizer, "pydoc", num_samples=8, seqlen=64, seed=3)
    other = calibration_samples(tokenizer, "pydoc", num_samples=8, seqlen=64, seed=4)
    assert first.shape == (8, 64) and first.dtype == torch.long
    assert torch.equal(first, again) and not torch.equal(first, other)
    windows = tokenize_corpus(tokenizer, load_corpus("pydoc", "calibration")).unfold(0, 64, 1)
    assert all((windows == row).all(dim=1).any() for row in first)


def test_calibration_rejects_impossible_requests(tokenizer, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    with pytest.raises(SlimlmError, match="fewer than one segment"):
        calibration_samples(tokenizer, load_corpus(str(short), "calibration"), num_samples=2, seqlen=64)
    with pytest.raises(SlimlmError, match="num_samples >= 1"):
        calibration_samples(tokenizer, "pydoc", num_samples=0)
