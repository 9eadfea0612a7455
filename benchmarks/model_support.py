"""Which architectures slimlm supports, end to end: the support table of `docs/models.md`, from checks run on
tiny random models built from each family's config (4 blocks, with mixed sliding-window and full-attention
layers where the family has them; `slimlm.models.tiny`).

Each cell is one check:
  load        save_pretrained + tokenizer, then `slimlm.load_model(dir)`: bitwise the same logits
  ppl         `slimlm.eval.perplexity` on a small text: a finite number
  rtn, gptq, awq, sparsegpt
              the method's recipe compresses the model: finite logits that differ from the float model's
  layer removal, flap
              the structured method removes blocks / narrows widths: finite logits, fewer parameters
  save/reload the GPTQ model saved as a slimlm checkpoint and loaded back: bitwise the same logits
  compressed-tensors
              the GPTQ model exported as compressed-tensors and loaded by plain transformers: the same
              logits (within 1e-5)
  generate    slimlm's runner, greedy: the same 12 tokens as transformers' `generate`

A cell reads "yes", "refused" (the method or runner declined before any work with a `SlimlmError`, whose
message is kept in the JSON) or "FAIL" (anything else: a bug). `tests/test_model_support.py` runs the same
checks and holds the committed table to them.

    python benchmarks/model_support.py            # writes results/model_support.{json,md} and the docs table
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from slimlm.compress import compress  # noqa: E402
from slimlm.data.corpora import Corpus  # noqa: E402
from slimlm.errors import SlimlmError  # noqa: E402
from slimlm.eval.efficiency import count_parameters  # noqa: E402
from slimlm.eval.perplexity import perplexity  # noqa: E402
from slimlm.export.native import load, save  # noqa: E402
from slimlm.infer import generate_ids  # noqa: E402
from slimlm.models.loading import load_model  # noqa: E402
from slimlm.models.tiny import MIXED_ATTENTION, TINY_FAMILIES, tiny_model, tiny_tokenizer  # noqa: E402

CALIBRATION = torch.randint(3, 262, (8, 32), generator=torch.Generator().manual_seed(0))
PROBE = torch.randint(3, 262, (2, 24), generator=torch.Generator().manual_seed(1))
TEXT = Corpus("toy", "eval", ("The quick brown fox jumps over the lazy dog. " * 30,), "model_support")
DOC_START, DOC_END = "<!-- support table: benchmarks/model_support.py -->", "<!-- end of support table -->"
NAMES = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral", "gemma": "Gemma", "gemma2": "Gemma 2",
         "gemma3_text": "Gemma 3", "opt": "OPT", "gpt2": "GPT-2", "qwen3": "Qwen3", "phi3": "Phi-3", "phi": "Phi",
         "gpt_neox": "GPT-NeoX", "falcon": "Falcon"}


def model_of(family: str):
    return tiny_model(family, blocks=4, vocab_size=262, **MIXED_ATTENTION.get(family, {}))


def logits(model, probe: torch.Tensor = PROBE) -> torch.Tensor:
    with torch.no_grad():
        return model(probe).logits


def compressed(family: str, stage: dict):
    model = model_of(family)
    compress(model, {"stages": [stage], "calibration": {"batch_size": 4}}, calibration=CALIBRATION)
    return model


def check_load(family: str) -> None:
    model = model_of(family)
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        tiny_tokenizer().save_pretrained(directory)
        loaded = load_model(directory).model
    assert torch.equal(logits(loaded), logits(model)), "reloaded logits differ"


def check_ppl(family: str) -> None:
    result = perplexity(model_of(family), tiny_tokenizer(), TEXT, seqlen=32, max_windows=4)
    assert math.isfinite(result.ppl) and result.ppl > 1, result.ppl


def check_method(stage: dict) -> Callable[[str], None]:
    def check(family: str) -> None:
        model = compressed(family, stage)
        after, before = logits(model), logits(model_of(family))
        assert torch.isfinite(after).all() and not torch.equal(after, before), "no finite change"
    return check


def check_structured(stage: dict) -> Callable[[str], None]:
    def check(family: str) -> None:
        model = compressed(family, stage)
        assert torch.isfinite(logits(model)).all(), "non-finite logits"
        assert count_parameters(model) < count_parameters(model_of(family)), "nothing removed"
    return check


def check_save_reload(family: str) -> None:
    model = compressed(family, {"method": "gptq", "bits": 4, "group_size": 32})
    with tempfile.TemporaryDirectory() as directory:
        save(model, Path(directory) / "m")
        reloaded, _ = load(Path(directory) / "m")
    assert torch.equal(logits(reloaded), logits(model)), "reloaded logits differ"


def check_compressed_tensors(family: str) -> None:
    from transformers import AutoModelForCausalLM

    from slimlm.export.compressed_tensors import export_compressed_tensors

    model = compressed(family, {"method": "gptq", "bits": 4, "group_size": 32})
    with tempfile.TemporaryDirectory() as directory:
        export_compressed_tensors(model, Path(directory) / "ct")
        loaded = AutoModelForCausalLM.from_pretrained(Path(directory) / "ct", dtype=torch.float32).eval()
        assert torch.allclose(logits(loaded), logits(model), atol=1e-5), "transformers' logits differ"


def check_generate(family: str) -> None:
    model, prompt = model_of(family), PROBE[0, :11].tolist()
    ours = generate_ids(model, [prompt], 12).tokens[0]
    with torch.no_grad():
        theirs = model.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert ours == theirs[0, len(prompt):].tolist(), "greedy tokens differ from transformers'"


CHECKS: dict[str, Callable[[str], None]] = {
    "load": check_load,
    "ppl": check_ppl,
    "rtn": check_method({"method": "rtn", "bits": 4, "group_size": 32}),
    "gptq": check_method({"method": "gptq", "bits": 4, "group_size": 32}),
    "awq": check_method({"method": "awq", "bits": 4, "group_size": 32, "grid": 4, "clip_search": False,
                         "search_dtype": "float32"}),  # coarse searches: this checks support, not quality
    "sparsegpt": check_method({"method": "sparsegpt", "sparsity": 0.5}),
    "layer removal": check_structured({"method": "drop_layers", "count": 1}),
    "flap": check_structured({"method": "flap", "ratio": 0.2}),
    "save/reload": check_save_reload,
    "compressed-tensors": check_compressed_tensors,
    "generate": check_generate,
}


def run_cell(family: str, check: Callable[[str], None]) -> dict:
    start = time.perf_counter()
    try:
        check(family)
        status, detail = "yes", ""
    except SlimlmError as error:
        status, detail = "refused", str(error)
    except Exception as error:  # noqa: BLE001 - a bug: reported in the cell, the matrix goes on
        status, detail = "FAIL", f"{type(error).__name__}: {error}"
    return {"status": status, "detail": detail, "seconds": round(time.perf_counter() - start, 2)}


def run_matrix(families: tuple[str, ...] = TINY_FAMILIES) -> dict[str, dict[str, dict]]:
    return {family: {name: run_cell(family, check) for name, check in CHECKS.items()} for family in families}


def table(matrix: dict[str, dict[str, dict]]) -> str:
    lines = ["| architecture | " + " | ".join(CHECKS) + " |", "|---" * (len(CHECKS) + 1) + "|"]
    for family, cells in matrix.items():
        lines.append(f"| {NAMES.get(family, family)} (`{family}`) | "
                     + " | ".join(cells[name]["status"] for name in CHECKS) + " |")
    return "\n".join(lines)


def refusals(matrix: dict[str, dict[str, dict]]) -> str:
    lines = [f"- {NAMES.get(family, family)}, {name}: {cell['detail']}"
             for family, cells in matrix.items() for name, cell in cells.items() if cell["status"] != "yes"]
    return "\n".join(lines)


def docs_section(matrix: dict[str, dict[str, dict]]) -> str:
    return f"{DOC_START}\n{table(matrix)}\n\nWhy each cell that is not \"yes\" is so:\n\n{refusals(matrix)}\n{DOC_END}"


def replace_docs_section(text: str, section: str) -> str:
    start, end = text.index(DOC_START), text.index(DOC_END) + len(DOC_END)
    return text[:start] + section + text[end:]


def main() -> None:
    from slimlm.results import atomic_write_text, library_versions, machine_info, utc_now, write_results

    torch.set_num_threads(1)
    matrix = run_matrix()
    result = {"matrix": matrix, "checks": list(CHECKS), "machine": machine_info(), "versions": library_versions(),
              "date": utc_now(), "command": "python benchmarks/model_support.py"}
    out = ROOT / "benchmarks" / "results" / "model_support"
    write_results(out, [result], table(matrix) + "\n\n" + refusals(matrix) + "\n",
                  preamble=f"# Architecture support\n\nCommand: `{result['command']}`  \nDate: {result['date']}\n\n"
                           + __doc__.split("\n\n")[1] + "\n")
    docs = ROOT / "docs" / "models.md"
    atomic_write_text(docs, replace_docs_section(docs.read_text(), docs_section(matrix)))
    print(table(matrix))
    failures = [(f, n) for f, cells in matrix.items() for n, c in cells.items() if c["status"] == "FAIL"]
    if failures:
        sys.exit(f"FAIL: {failures}")


if __name__ == "__main__":
    main()
