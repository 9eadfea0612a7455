"""Corpora, calibration samples and zero-shot tasks."""

from slimlm.data.calibration import calibration_samples, tokenize_corpus
from slimlm.data.corpora import CORPORA, Corpus, load_corpus

__all__ = ["CORPORA", "Corpus", "calibration_samples", "load_corpus", "tokenize_corpus"]
