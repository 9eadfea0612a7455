"""File sizes: how large is a compressed SmolLM2-135M checkpoint, and what makes up the rest?

Writes `benchmarks/results/file_sizes.{json,md}`. Each row compresses the embedded float32 model with a
data-free recipe (RTN, so the sizes do not depend on calibration), saves it as a slimlm checkpoint and
reports the bytes of its weights and configs (`slimlm.export.native.model_bytes`) against the float32
checkpoint's:

- W4 g64 with the unquantized tensors (tied embedding, norms) kept float32 (`float_storage: float32`,
  the default before issue 15) and with the default `float_storage: auto` (bfloat16 for this float32
  source);
- with the LM head at 8 bits (untied: the embedding stays, in bfloat16);
- with the head and the embedding quantized together (`quantize_head` `embedding: true`: the tied matrix
  stored once, 8-bit per channel, or 4-bit g64).

llama.cpp's own Q4_0 file of the same model is read from `benchmarks/results/gguf_export.json` when
present (its token embedding is Q8_0, reused as the output head). Quality of these variants:
`benchmarks/results/deploy.md`.

    python benchmarks/file_sizes.py
"""

from __future__ import annotations

import copy
import json
import shlex
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
W4 = {"method": "rtn", "bits": 4, "group_size": 64}
VARIANTS = {
    "float32": None,
    "W4 g64, float32 storage": {"stages": [W4], "float_storage": "float32"},
    "W4 g64 (default storage: auto)": {"stages": [W4]},
    "W4 g64 + head 8-bit": {"stages": [{"method": "quantize_head", "bits": 8}, W4]},
    "W4 g64 + head and embedding 8-bit": {"stages": [{"method": "quantize_head", "bits": 8, "embedding": True}, W4]},
    "W4 g64 + head and embedding 4-bit g64": {
        "stages": [{"method": "quantize_head", "bits": 4, "group_size": 64, "embedding": True}, W4]},
}


def main() -> None:
    from slimlm.compress import compress
    from slimlm.export.native import model_bytes, save
    from slimlm.models.loading import load_model
    from slimlm.results import machine_info, markdown_table, utc_now, write_results

    loaded = load_model("smollm2-135m")
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for index, (name, recipe) in enumerate(VARIANTS.items()):
            model = copy.deepcopy(loaded.model)
            storage = compress(model, recipe).float_storage if recipe else "float32"
            size = model_bytes(save(model, Path(scratch) / f"m{index}"))
            rows.append({"variant": name, "recipe": recipe, "float_storage": storage, "file_bytes": size})
            print(f"{name}: {size:,} bytes", flush=True)
    for row in rows:
        row["ratio_to_float32"] = row["file_bytes"] / rows[0]["file_bytes"]
    rows += llama_cpp_rows(rows[0]["file_bytes"])
    record = {"benchmark": "file_sizes", "model": "smollm2-135m", "rows": rows, "machine": machine_info(),
              "date": utc_now(), "command": shlex.join([sys.executable, *sys.argv])}
    preamble = (f"# Checkpoint sizes: SmolLM2-135M\n\nCommand: `{record['command']}`, {record['date']}. Bytes of "
                "each saved slimlm checkpoint's weights and configs (tokenizer files left out); the llama.cpp row "
                "is a GGUF file read from gguf_export.json. See the docstring of benchmarks/file_sizes.py.")
    table = markdown_table(rows, ["variant", "float_storage", "file_bytes", "ratio_to_float32"])
    json_path, md_path = write_results(RESULTS / "file_sizes", [record], table, preamble)
    print(preamble + "\n\n" + table)
    print(f"wrote {json_path} and {md_path}")


def llama_cpp_rows(float_bytes: int) -> list[dict]:
    path = RESULTS / "gguf_export.json"
    if not path.is_file():
        return []
    rows = json.loads(path.read_text())[0]["rows"]
    found = [row for row in rows if row.get("written_by", "").startswith("llama.cpp")]
    return [{"variant": f"{row['config']} (GGUF, {path.name})", "float_storage": "-", "file_bytes": row["file_bytes"],
             "ratio_to_float32": row["file_bytes"] / float_bytes} for row in found]


if __name__ == "__main__":
    main()
