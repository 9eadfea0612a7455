"""Fingerprints of every preset's compressed weights on a tiny model: the no-behaviour-change check.

Each preset in `slimlm.compress.presets.PRESETS` compresses the same tiny random models (a Llama with 2
blocks, hidden 128, MLP 256; the 2-block, hidden-64 OPT and GPT-2 of `slimlm.models.tiny`, whose post-norm
MLP, ReLU, biases and fused Conv1D attention take other code paths; all seeded) on the same random
calibration tokens, on one thread; the script records a SHA-256 of the resulting state dict (names,
dtypes, shapes and bytes) and of the logits on a fixed probe. A preset a model cannot take records its
error message instead, which must not change either.

    python benchmarks/preset_fingerprints.py --write benchmarks/results/preset_fingerprints.json
    python benchmarks/preset_fingerprints.py --check benchmarks/results/preset_fingerprints.json

`--check` recomputes every fingerprint and exits non-zero on any difference. Fingerprints are exact
float bits, so compare runs made on the same machine (CPU kernels differ between AVX2 and AVX-512).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from slimlm.compress import compress
from slimlm.compress.presets import PRESETS
from slimlm.models.tiny import tiny_model
from slimlm.results import machine_info

CONFIG = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)


FAMILIES = ("llama", "opt", "gpt2")


def tiny(family: str) -> torch.nn.Module:
    if family != "llama":
        return tiny_model(family)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **CONFIG), dtype=torch.float32).eval()


def digest_state(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        flat = tensor.detach().cpu().reshape(-1).contiguous()  # 0-d tensors cannot be viewed as bytes
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()


def fingerprint(family: str, preset: str) -> dict:
    calibration = torch.randint(0, CONFIG["vocab_size"], (16, 64), generator=torch.Generator().manual_seed(0))
    probe = torch.randint(0, CONFIG["vocab_size"], (2, 48), generator=torch.Generator().manual_seed(1))
    model = tiny(family)
    torch.manual_seed(0)
    start = time.perf_counter()
    try:
        compress(model, preset, calibration=calibration)
    except Exception as error:  # noqa: BLE001 - a preset this tiny model cannot take is recorded, not fatal
        return {"error": f"{type(error).__name__}: {error}"}
    with torch.no_grad():
        logits = model(probe).logits.contiguous()
    return {"state": digest_state(model), "logits": hashlib.sha256(logits.numpy().tobytes()).hexdigest(),
            "seconds": round(time.perf_counter() - start, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", type=Path, help="record the fingerprints in this JSON file")
    mode.add_argument("--check", type=Path, help="compare against the fingerprints in this JSON file")
    parser.add_argument("--presets", help="comma-separated subset (default: all)")
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated tiny model families")
    parser.add_argument("--report", type=Path, help="with --check: also write the comparison as a Markdown table")
    args = parser.parse_args()
    torch.set_num_threads(1)
    presets = args.presets.split(",") if args.presets else list(PRESETS)
    names = [f"{family}/{preset}" for family in args.families.split(",") for preset in presets]
    results = {}
    for name in names:
        results[name] = fingerprint(*name.split("/"))
        print(f"{name:40s} {results[name].get('state', results[name].get('error'))[:64]}", flush=True)
    if args.write:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        meta = {"command": " ".join(sys.argv), "commit": commit, "machine": machine_info()["cpu"],
                "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__}
        args.write.write_text(json.dumps({"meta": meta, "presets": results}, indent=1) + "\n")
        return 0
    reference = json.loads(args.check.read_text())["presets"]
    new = [n for n in names if n not in reference]  # presets added since the reference: nothing to compare
    bad = [n for n in names if n in reference and {k: v for k, v in results[n].items() if k != "seconds"}
           != {k: v for k, v in reference[n].items() if k != "seconds"}]
    missing = sorted(set(reference) - set(results)) if not (args.presets or args.families != ",".join(FAMILIES)) else []
    summary = (f"{len(names) - len(bad) - len(new)} identical, {len(bad)} different: {bad}; missing presets: "
               f"{missing}; new since the reference (not compared): {len(new)}")
    print(summary)
    if args.report:
        write_report(args.report, args.check, json.loads(args.check.read_text())["meta"], reference, results, bad,
                     summary)
    return 1 if bad or missing else 0


def write_report(path: Path, reference_path: Path, reference: dict, reference_presets: dict, results: dict,
                 bad: list[str], summary: str) -> None:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "slimlm"], capture_output=True, text=True).stdout.strip()
    lines = [
        "# Preset fingerprints: compressed weights before and after a change",
        "",
        f"Reference: `{reference_path}`, written at commit {reference['commit']} ({reference['date']}, "
        f"{reference['machine']}, torch {reference['torch']}) by `{reference['command']}`.",
        f"Checked: commit {commit}{' with uncommitted changes under slimlm/' if dirty else ''}, "
        f"{time.strftime('%Y-%m-%d')}, {machine_info()['cpu']}, torch {torch.__version__}, "
        f"by `{' '.join(sys.argv)}`.",
        "",
        f"**{summary}**",
        "",
        "Tiny random models (Llama: 2 blocks, hidden 128, MLP 256; OPT and GPT-2: 2 blocks, hidden 64; seed 0), "
        "16 x 64 random calibration tokens, one thread. "
        "`state`: SHA-256 of the state dict (names, dtypes, shapes, bytes); `logits`: of the logits on a fixed probe. "
        "A preset the tiny model cannot take records its error, which must also be unchanged.",
        "",
        "| model/preset | same | state | logits |",
        "|---|---|---|---|",
    ]
    for name, result in results.items():
        state = result.get("state", result.get("error", ""))[:16]
        same = "new" if name not in reference_presets else "no" if name in bad else "yes"
        lines.append(f"| {name} | {same} | {state} | {result.get('logits', '')[:16]} |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
