"""Text corpora for perplexity and calibration, with fixed, non-overlapping splits.

Each corpus has an evaluation split and a calibration split that share no text:

| corpus      | evaluation split                          | calibration split                        |
|-------------|-------------------------------------------|------------------------------------------|
| `wikitext2` | `wikitext2/wiki.test.raw` (test, raw)     | `wikitext2/wiki.valid.tokens` (validation) |
| `ptb`       | `ptb/ptb.test.txt` (test)                 | `ptb/ptb.valid.txt` (validation)         |
| `c4`        | `c4/c4_validation_2k.jsonl` docs 1000-1999 | the same file, docs 0-999               |
| `pydoc`     | odd-numbered distinct topics of `pydoc_data.topics` (sorted by key) | even-numbered ones |

WikiText-2's raw train split is not in the data directory, so calibration on `wikitext2` uses the
validation split (tokenized `<unk>` version). `pydoc` is the embedded default: the Python
documentation topics that every Python install ships, so it needs no data directory and no network.

Sources, in order: the data directory (`data_dir` argument, else `SLIMLM_DATA`), then, for
`wikitext2` and `ptb` only, Hugging Face `datasets` when it is installed and the hub is reachable
(there, calibration uses the train split, as the GPTQ reference code does; this path cannot be
exercised on a machine without network, so it is not covered by the tests).
A path to a `.txt` file (one document) or a `.jsonl` file (a `"text"` field per line) is also a
corpus: the user's own text, used whole for either purpose.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from slimlm.errors import SlimlmError

CORPORA = ("wikitext2", "ptb", "c4", "pydoc")
SPLITS = ("eval", "calibration")
C4_FILE = "c4/c4_validation_2k.jsonl"
C4_EVAL_DOCS = range(1000, 2000)
C4_CALIBRATION_DOCS = range(0, 1000)


@dataclass(frozen=True)
class Corpus:
    name: str
    split: str
    documents: tuple[str, ...]
    source: str  # file path or dataset id, recorded in results

    @property
    def text(self) -> str:
        """The documents joined with a blank line, as the GPTQ reference code does before tokenizing."""
        return "\n\n".join(self.documents)


def resolve_data_dir(data_dir: str | os.PathLike[str] | None) -> Path | None:
    """The data directory from the argument, else SLIMLM_DATA; None if neither is set."""
    value = data_dir if data_dir is not None else os.environ.get("SLIMLM_DATA")
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise SlimlmError(f"data directory not found: {path} (pass an existing folder with --data-dir or SLIMLM_DATA)")
    return path


def required_data_dir(data_dir: str | os.PathLike[str] | None, what: str) -> Path:
    """The data directory, or an error that says `what` needs one and how to give it."""
    directory = resolve_data_dir(data_dir)
    if directory is None:
        raise SlimlmError(f"{what} needs a data directory: pass --data-dir DIR or set SLIMLM_DATA")
    return directory


def data_file(directory: Path, relative: str) -> Path:
    """`directory / relative`, or an error naming the file the data directory lacks."""
    path = directory / relative
    if not path.is_file():
        raise SlimlmError(f"data file missing: {path} (the data directory must hold {relative})")
    return path


def is_user_corpus(name: str) -> bool:
    return name.endswith((".txt", ".jsonl")) and Path(name).expanduser().is_file()


def load_corpus(name: str, split: str = "eval", data_dir: str | os.PathLike[str] | None = None) -> Corpus:
    """Load one split of a named corpus, or a user's .txt / .jsonl file."""
    if split not in SPLITS:
        raise SlimlmError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    if is_user_corpus(name):
        return _user_corpus(Path(name).expanduser(), split)
    if name not in CORPORA:
        raise SlimlmError(
            f"unknown corpus {name!r}: choose one of {', '.join(CORPORA)}, or give a path to a .txt or .jsonl file"
        )
    if name == "pydoc":
        return _pydoc(split)
    directory = resolve_data_dir(data_dir)
    if directory is not None:
        return _from_data_dir(name, split, directory)
    return _from_hf_datasets(name, split)


def _read(directory: Path, relative: str) -> str:
    return read_utf8(data_file(directory, relative))


def read_utf8(path: Path) -> str:
    """A text file's contents; a file that is not UTF-8 fails with where and how to convert it."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise SlimlmError(f"{path} is not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start}): "
                          f"convert it, e.g. iconv -f latin1 -t utf-8 {path.name} > fixed.txt") from None


def wikitext_rows(raw: str) -> list[str]:
    """Rows as Hugging Face's wikitext dataset gives them: each line keeps its newline, blank lines are ''."""
    lines = raw.split("\n")[:-1]
    return [line + "\n" if line.strip() else "" for line in lines]


def _from_data_dir(name: str, split: str, directory: Path) -> Corpus:
    evaluating = split == "eval"
    if name == "wikitext2":
        relative = "wikitext2/wiki.test.raw" if evaluating else "wikitext2/wiki.valid.tokens"
        documents = wikitext_rows(_read(directory, relative))
    elif name == "ptb":
        relative = "ptb/ptb.test.txt" if evaluating else "ptb/ptb.valid.txt"
        # As the Hugging Face ptb_text_only dataset: one stripped sentence per line.
        documents = [line.strip() for line in _read(directory, relative).splitlines()]
    else:  # c4
        relative = C4_FILE
        rows = [json.loads(line)["text"] for line in _read(directory, relative).splitlines() if line.strip()]
        picked = C4_EVAL_DOCS if evaluating else C4_CALIBRATION_DOCS
        if len(rows) < picked.stop:
            raise SlimlmError(f"{directory / relative} has {len(rows)} documents; slimlm needs {picked.stop}")
        documents = [rows[i] for i in picked]
        relative += f" docs {picked.start}-{picked.stop - 1}"
    return Corpus(name=name, split=split, documents=tuple(documents), source=str(directory / relative))


def _pydoc(split: str) -> Corpus:
    from pydoc_data.topics import topics

    # Some topics share one text ("if" and "else"): deduplicate so the two splits never overlap.
    unique = list(dict.fromkeys(topics[key] for key in sorted(topics)))
    parity = 1 if split == "eval" else 0
    documents = tuple(text for i, text in enumerate(unique) if i % 2 == parity)
    which = "odd" if parity else "even"
    return Corpus(name="pydoc", split=split, documents=documents, source=f"pydoc_data.topics ({which}-numbered topics)")


def _user_corpus(path: Path, split: str) -> Corpus:
    text = read_utf8(path)
    if path.suffix == ".jsonl":
        try:
            documents = tuple(json.loads(line)["text"] for line in text.splitlines() if line.strip())
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise SlimlmError(f"{path}: every line must be a JSON object with a \"text\" field ({error})") from error
    else:
        documents = (text,)
    if not any(doc.strip() for doc in documents):
        raise SlimlmError(f"{path} holds no text")
    return Corpus(name=path.name, split=split, documents=documents, source=str(path))


# Hugging Face dataset ids whose rows match the data-directory files above.
_HF_DATASETS = {
    ("wikitext2", "eval"): ("wikitext", "wikitext-2-raw-v1", "test", "text"),
    ("wikitext2", "calibration"): ("wikitext", "wikitext-2-raw-v1", "train", "text"),
    ("ptb", "eval"): ("ptb_text_only", "penn_treebank", "test", "sentence"),
    ("ptb", "calibration"): ("ptb_text_only", "penn_treebank", "train", "sentence"),
}


def _from_hf_datasets(name: str, split: str) -> Corpus:
    no_data = f"corpus {name!r} needs a data directory: pass --data-dir DIR or set SLIMLM_DATA"
    if (name, split) not in _HF_DATASETS:
        raise SlimlmError(no_data)
    try:
        import datasets
    except ImportError:
        raise SlimlmError(no_data + " (or install `datasets` and go online)") from None
    from slimlm.models.loading import hub_reachable

    if not hub_reachable():
        raise SlimlmError(no_data + " (the Hugging Face hub is not reachable, so `datasets` cannot fetch it)")
    path, config, hf_split, column = _HF_DATASETS[(name, split)]
    rows = datasets.load_dataset(path, config, split=hf_split)[column]
    documents = tuple(row.strip() for row in rows) if name == "ptb" else tuple(rows)
    return Corpus(name=name, split=split, documents=documents, source=f"hf:{path}/{config}/{hf_split}")
