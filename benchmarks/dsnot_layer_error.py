"""What DSnoT changes in one layer's error, against the Wanda mask it starts from, on SmolLM2-135M.

DSnoT (Zhang et al., ICLR 2024) swaps pruned and kept weights of each output row until the row's
expected reconstruction error sum_j W_ij E[x_j] over the pruned j (the mean shift of the output) is
near zero. It does not look at the error's variance. This script measures both on real layers, for
the 50% Wanda mask and for DSnoT's refinement of it (the recipe defaults, as the pruning benchmark
runs it), on the calibration tokens and on held-out C4 tokens:

- relative output error: ||(W * M) X||^2 / ||W X||^2, M the pruned positions;
- squared mean shift: the mean over output rows of (mean over tokens of (W * M) x)^2, relative to the
  mean over rows of (mean over tokens of W x)^2.

Inputs are those of the dense model (no earlier block pruned), 32 x 512 C4 calibration tokens
(seed 0) and 8 x 512 held-out ones (seed 1).

    python benchmarks/dsnot_layer_error.py --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
LINEARS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--blocks", default="3,15,27")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--quick", action="store_true", help="4 + 2 segments of 128 tokens, one block")
    parser.add_argument("--out", default=str(RESULTS / "dsnot_layer_error"))
    args = parser.parse_args()
    samples, held_out, seqlen = (4, 2, 128) if args.quick else (32, 8, 512)
    blocks = [int(b) for b in args.blocks.split(",")][: 1 if args.quick else None]
    if args.quick and Path(args.out).parent == RESULTS:
        args.out += "-quick"

    import torch

    from slimlm.core.sparsity import unstructured_mask
    from slimlm.core.statistics import ChannelStatistics
    from slimlm.data.calibration import calibration_samples
    from slimlm.models.loading import load_model
    from slimlm.prune.common import wanda_score
    from slimlm.prune.dsnot import DSnoTStage, dsnot_refine
    from slimlm.results import library_versions, machine_info, markdown_table, utc_now, write_results

    lm = load_model("smollm2-135m")
    calibration = calibration_samples(lm.tokenizer, "c4", samples, seqlen, 0, args.data_dir)
    evaluation = calibration_samples(lm.tokenizer, "c4", held_out, seqlen, 1, args.data_dir)
    stage = DSnoTStage(method="dsnot", sparsity=args.sparsity)
    rows = []
    by_split = capture_inputs(lm.model, blocks, calibration), capture_inputs(lm.model, blocks, evaluation)
    for block in blocks:
        inputs = by_split[0][block], by_split[1][block]
        for name in LINEARS:
            weight = lm.model.model.layers[block].get_submodule(name).weight.detach().float()
            statistics = ChannelStatistics(weight.shape[1], torch.device("cpu"))
            for x in inputs[0][name]:
                statistics.add_batch(x[None])
            score = wanda_score(weight, statistics)
            wanda = unstructured_mask(score, args.sparsity, per_row=True)
            dsnot = dsnot_refine(weight, wanda, score, score, statistics.sum_per_sample(), statistics.variance(), stage)
            for split, split_inputs in zip(("calibration", "held-out"), inputs):
                x = torch.cat(split_inputs[name])
                rows.append({"block": block, "linear": name, "tokens": split,
                             "changed_positions": int((wanda != dsnot).sum()),
                             **errors("wanda", weight, wanda, x), **errors("dsnot", weight, dsnot, x)})
            print(rows[-2], rows[-1], sep="\n", flush=True)
    command = shlex.join(["python", "benchmarks/dsnot_layer_error.py", *sys.argv[1:]])
    result = {"model": "smollm2-135m", "sparsity": args.sparsity, "calibration": f"{samples} x {seqlen} C4, seed 0",
              "held_out": f"{held_out} x {seqlen} C4, seed 1", "stage": stage.model_dump(), "rows": rows,
              "machine": machine_info(), "versions": library_versions(), "date": utc_now(), "command": command}
    m = result["machine"]
    preamble = (f"# DSnoT against its initial Wanda mask, layer by layer: smollm2-135m\n\nCommand: `{command}`  \n"
                f"Machine: {m['cpu']}, {m['cores']} cores  \nDate: {result['date']}\n\n"
                f"{args.sparsity:.0%} per-row sparsity. Calibration {result['calibration']}; held-out "
                f"{result['held_out']}; inputs from the dense model. rel_error: ||(W*M)X||^2 / ||WX||^2; "
                "rel_mean_shift: squared per-row mean of (W*M)X over squared per-row mean of WX (both averaged "
                "over rows). DSnoT's defaults leave the MLP linears with the Wanda mask (as its reference code); "
                "down_proj is refined here anyway, for comparison.")
    write_results(args.out, [result], markdown_table(rows), preamble=preamble)
    print(Path(args.out).with_suffix(".md").read_text())


def capture_inputs(model, blocks: list[int], ids) -> dict[int, dict[str, list]]:
    """Each named linear's input in each of `blocks`, one (tokens, features) tensor per sequence."""
    import torch

    captured = {block: {name: [] for name in LINEARS} for block in blocks}
    hooks = [model.model.layers[block].get_submodule(name).register_forward_hook(
        lambda _m, args, _out, sink=captured[block][name]: sink.append(args[0].detach()[0].float()))
        for block in blocks for name in LINEARS]
    try:
        with torch.inference_mode():
            for row in ids:
                model.model(row[None], use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return captured


def errors(label: str, weight, pruned_mask, x) -> dict[str, float]:
    dense_out = x @ weight.T
    lost = x @ (weight * pruned_mask).T
    return {f"{label}_rel_error": float(lost.square().sum() / dense_out.square().sum()),
            f"{label}_rel_mean_shift": float(lost.mean(0).square().mean() / dense_out.mean(0).square().mean())}


if __name__ == "__main__":
    main()
