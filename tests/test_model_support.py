"""The support table of docs/models.md is what the checks of benchmarks/model_support.py give today."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import model_support  # noqa: E402

# (family, check) cells a method or the runner refuses, by design (the reasons are in the docs table).
EXPECTED_REFUSALS = {
    ("falcon", "generate"),
    ("gpt2", "flap"), ("phi3", "flap"), ("gpt_neox", "flap"), ("falcon", "flap"),  # fused qkv
    ("phi", "awq"),  # one norm in front of both halves
    ("gpt2", "compressed-tensors"),  # Conv1D layers: compressed-tensors loads quantized nn.Linear only
}


@pytest.fixture(scope="module")
def matrix():
    return model_support.run_matrix()


def test_every_cell_works_or_is_refused_as_expected(matrix):
    failures = {(f, n): c["detail"] for f, cells in matrix.items() for n, c in cells.items() if c["status"] == "FAIL"}
    assert not failures
    refused = {(f, n) for f, cells in matrix.items() for n, c in cells.items() if c["status"] == "refused"}
    assert refused == EXPECTED_REFUSALS


def test_the_docs_table_is_the_matrix(matrix):
    docs = (ROOT / "docs" / "models.md").read_text()
    section = docs[docs.index(model_support.DOC_START) : docs.index(model_support.DOC_END) + len(model_support.DOC_END)]
    assert section == model_support.docs_section(matrix), "rerun python benchmarks/model_support.py"
