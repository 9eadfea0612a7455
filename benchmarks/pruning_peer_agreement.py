"""Where slimlm's and llm-compressor's Wanda and SparseGPT part ways, and how far rounding alone reaches.

Writes `benchmarks/results/pruning_peer_agreement.{json,md}`. For each (config, method) it prunes
SmolLM2-135M three times on the same 128 x 512 calibration tokens as `benchmarks/pruning.py`:
llm-compressor (its own virtual environment), slimlm as `pruning.py` runs it (calibration batch 8;
Wanda's channel norms summed in float64, SparseGPT's Hessian a float32 running mean), and slimlm
with the same arithmetic in llm-compressor's rounding: for Wanda the channel norms accumulated as
llm-compressor and the Wanda reference code do (a float32 running mean, one update per segment;
the benchmark swaps slimlm's accumulator for that one, nothing else changes), for SparseGPT
calibration batch 1 (llm-compressor's), which changes only the order of the float32 Hessian's
additions. Both compute the same quantities and differ only in rounding, so the two slimlm runs
show how far rounding alone moves a pruned model. Columns: WikiText-2 perplexity (seqlen 512, first 40
windows, the windows of `pruning.py`, always evaluated with fused attention) and the share of
weights whose keep/prune decision differs between two runs, over all pruned linears and per block
(the first block where the masks differ and the disagreement in the first, middle and last block).

    python benchmarks/pruning_peer_agreement.py --data-dir ../shared/data
    python benchmarks/pruning_peer_agreement.py --data-dir ../shared/data --quick   # checks the script

Each finished run is kept in `benchmarks/results/.pruning_peer_agreement.partial.json` with its
masks (packed bits) in `benchmarks/results/.pruning_peer_agreement.masks/`, so an interrupted run
resumes.
"""

from __future__ import annotations

import shlex
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _shared import compress_job, llmcompressor, run_child, start  # noqa: E402

CONFIGS = {"50%": {"sparsity": 0.5}, "60%": {"sparsity": 0.6}, "70%": {"sparsity": 0.7},
           "2:4": {"pattern": "2:4"}, "4:8": {"pattern": "4:8"}}
METHODS = {"Wanda": "wanda", "SparseGPT": "sparsegpt"}
# Settings where llm-compressor came out ahead in pruning.md: the smallest and the largest Wanda gap, and
# SparseGPT's two largest.
CASES = (("50%", "Wanda"), ("70%", "Wanda"), ("70%", "SparseGPT"), ("4:8", "SparseGPT"))
ROUNDED = {"Wanda": "slimlm float32 statistics", "SparseGPT": "slimlm batch 1"}  # same math, other rounding


def runs_of(method: str) -> tuple[str, str, str]:
    return "slimlm", ROUNDED[method], "llm-compressor"


def pairs_of(method: str) -> tuple[tuple[str, str], ...]:
    ours, rounded, peer = runs_of(method)
    return (ours, rounded), (ours, peer), (rounded, peer)


class Float32RunningNorms:
    """Wanda's ||X_j||^2 / segments as llm-compressor and the reference code accumulate it: a float32
    running mean updated once per segment (`scaler_row *= n / (n + 1); scaler_row += |x_j|^2 / (n + 1)`)."""

    def __init__(self, in_features: int, device=None):
        import torch

        self.norms = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.samples = 0

    def add_batch(self, inputs) -> None:
        for segment in inputs.reshape(-1, *inputs.shape[-2:]):
            self.norms *= self.samples / (self.samples + 1)
            self.samples += 1
            self.norms += segment.float().norm(p=2, dim=0) ** 2 / self.samples

    def squared_norm_per_sample(self):
        return self.norms


def run_job(spec: dict) -> dict:
    """Child process: prune with slimlm, measure perplexity, write the pruned linears' weights."""
    from safetensors.torch import save_file

    from slimlm.eval.perplexity import perplexity

    if spec.get("float32_statistics"):
        import slimlm.prune.common

        slimlm.prune.common.ChannelStatistics = Float32RunningNorms  # Wanda's only accumulator
    model, tokenizer, result, _ = compress_job(spec, "pruning_seconds")
    windows = spec["protocol"]["perplexity"]
    result["wikitext2_ppl"] = perplexity(model, tokenizer, "wikitext2", windows["seqlen"], windows["max_windows"],
                                         spec["data_dir"]).ppl
    save_file({f"{name}.weight": module.weight.detach().float().contiguous()
               for name, module in model.named_modules() if name.startswith("model.layers.")
               and hasattr(module, "weight") and module.weight.dim() == 2}, spec["weights"])
    return result


def save_masks(weights_path: str, masks_path: Path) -> None:
    """The zero pattern of every weight in `weights_path`, as packed bits (a weight file is 0.4 GB)."""
    import numpy as np
    from safetensors.torch import load_file

    weights = load_file(weights_path)
    packed = {name: np.packbits((w == 0).numpy().reshape(-1)) for name, w in weights.items()}
    shapes = {f"shape:{name}": np.array(w.shape) for name, w in weights.items()}
    tmp = masks_path.with_name(masks_path.name + ".tmp.npz")
    np.savez(tmp, **packed, **shapes)
    tmp.replace(masks_path)


def load_masks(path: str) -> dict:
    import numpy as np

    if not Path(path).is_file():
        raise RuntimeError(f"{path} is missing: delete the progress file next to it and run again")
    data = np.load(path)
    return {name: (data[name], int(np.prod(data[f"shape:{name}"]))) for name in data.files
            if not name.startswith("shape:")}


def mask_disagreement(a_path: str, b_path: str) -> dict:
    """The share of weights pruned in one run and kept in the other: overall and per block."""
    import re

    import numpy as np

    a, b = load_masks(a_path), load_masks(b_path)
    shared = sorted(set(a) & set(b))
    if not shared:
        raise RuntimeError(f"no common weights between {a_path} and {b_path}")
    per_block: dict[int, list[int]] = {}
    for name in shared:
        block = int(re.search(r"layers\.(\d+)\.", name).group(1))
        differ = int(np.unpackbits(a[name][0] ^ b[name][0]).sum())
        counts = per_block.setdefault(block, [0, 0])
        counts[0] += differ
        counts[1] += a[name][1]
    blocks = [per_block[i][0] / per_block[i][1] for i in sorted(per_block)]
    first = next((i for i, share in enumerate(blocks) if share > 0), None)
    return {"overall": sum(c[0] for c in per_block.values()) / sum(c[1] for c in per_block.values()),
            "first_block_differing": first, "per_block": blocks}


def one_run(config: str, method: str, run: str, args, proto: dict, tokens: dict, masks_dir: Path) -> dict:
    """Prune once (slimlm in a child process, or llm-compressor in its venv); keep ppl, time and masks."""
    stage = {"method": METHODS[method], **CONFIGS[config]}
    masks = masks_dir / f"{config.replace('%', 'pct').replace(':', 'of')}-{METHODS[method]}-{run.replace(' ', '-')}.npz"
    with tempfile.TemporaryDirectory() as directory:
        weights = str(Path(directory) / "weights.safetensors")
        if run == "llm-compressor":
            settings = CONFIGS[config]
            peer = llmcompressor(tokens, ["--algo", METHODS[method], "--sparsity", str(settings.get("sparsity", 0.5)),
                                          "--mask-structure", settings.get("pattern", "0:0"), "--dump-weights", weights])
            if peer["status"] != "ok":
                raise RuntimeError(f"llm-compressor {method} {config}: {peer['status']}: {peer.get('error')}")
            result = {"wikitext2_ppl": peer["ppl"], "pruning_seconds": peer["compression_seconds"],
                      "versions": peer.get("versions")}
        else:
            spec = {"protocol": proto, "data_dir": args.data_dir, "config": config, "method": method, "stage": stage,
                    "calibration": tokens["calib_pt"], "weights": weights,
                    "calibration_batch_size": 1 if run.endswith("batch 1") else 8,
                    "float32_statistics": run.endswith("float32 statistics")}
            result = run_child(__file__, args.data_dir, spec)
        save_masks(weights, masks)
    return {"config": config, "method": method, "run": run, "wikitext2_ppl": result["wikitext2_ppl"],
            "pruning_seconds": result["pruning_seconds"], "masks": str(masks),
            **({"versions": result["versions"]} if "versions" in result else {})}


def compare(config: str, method: str, runs: dict) -> dict:
    row = {"config": config, "method": method}
    for run in runs_of(method):
        row[f"ppl {run}"] = runs[run]["wikitext2_ppl"]
    for a, b in pairs_of(method):
        row[f"masks {a} vs {b}"] = mask_disagreement(runs[a]["masks"], runs[b]["masks"])
    return row


def _table(rows: list[dict]) -> str:
    from slimlm.results import markdown_table

    ppl = []
    for r in rows:
        ours, rounded, peer = runs_of(r["method"])
        ppl.append({"config": r["config"], "method": r["method"], "slimlm": r[f"ppl {ours}"],
                    "slimlm, other rounding": r[f"ppl {rounded}"], "(which)": rounded.removeprefix("slimlm "),
                    "llm-compressor": r[f"ppl {peer}"],
                    "other rounding vs slimlm (%)": 100 * (r[f"ppl {rounded}"] / r[f"ppl {ours}"] - 1),
                    "llm-compressor vs slimlm (%)": 100 * (r[f"ppl {peer}"] / r[f"ppl {ours}"] - 1)})
    masks = []
    for r in rows:
        for a, b in pairs_of(r["method"]):
            m = r[f"masks {a} vs {b}"]
            blocks = m["per_block"]
            masks.append({"config": r["config"], "method": r["method"], "runs compared": f"{a} / {b}",
                          "differing (%)": 100 * m["overall"], "first block differing": m["first_block_differing"],
                          "block 1 (%)": 100 * blocks[1], f"block {len(blocks) // 2} (%)": 100 * blocks[len(blocks) // 2],
                          f"block {len(blocks) - 1} (%)": 100 * blocks[-1]})
    return ("## WikiText-2 perplexity\n\n" + markdown_table(ppl) +
            "\n\n## Keep/prune decisions that differ between two runs\n\n" + markdown_table(masks))


def main() -> None:
    started = start(__doc__, CONFIGS, METHODS, "pruning_peer_agreement", 128, run_job)
    if started is None:
        return
    args, proto, out, progress, tokens = started
    from slimlm.results import library_versions, machine_info, utc_now, write_results

    configs = {c.strip() for c in args.configs.split(",")}
    methods = {m.strip() for m in args.methods.split(",")}
    masks_dir = progress.path.with_name(progress.path.name.replace(".partial.json", ".masks"))
    masks_dir.mkdir(exist_ok=True)
    rows, runs = [], []
    for config, method in CASES:
        if config in configs and method in methods:
            done = {run: progress.record(f"{config}/{method}/{run}", lambda c=config, m=method, r=run: one_run(
                c, m, r, args, proto, tokens, masks_dir)) for run in runs_of(method)}
            runs += done.values()
            rows.append(compare(config, method, done))
    command = shlex.join(["python", "benchmarks/pruning_peer_agreement.py", *sys.argv[1:]])
    result = {"model": "smollm2-135m", "protocol": proto, "rows": rows, "runs": runs, "machine": machine_info(),
              "versions": library_versions(), "date": utc_now(), "command": command}
    m = result["machine"]
    preamble = (f"# Pruning: slimlm against llm-compressor, decision by decision: smollm2-135m\n\nCommand: "
                f"`{command}`  \nMachine: {m['cpu']}, {m['cores']} cores  \nDate: {result['date']}\n\n"
                + __doc__.split("\n\n")[1].replace("\n", " ") + "\n")
    write_results(out, [result], _table(rows), preamble=preamble)
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
