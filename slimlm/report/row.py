"""One row of `slimlm compare`: load the model, apply one recipe (or none, for the float row), and measure
what it cost and gained, in a process of its own so that its peak memory is its own.

Run as `python -m slimlm.report.row SPEC.json OUT.json` by the sweep (`slimlm.report.sweep`); the row is
written to OUT.json atomically. The measurements:

* quality: `slimlm.eval.runner.evaluate` on the sweep's tasks, with the KL divergence from the float model
  on every perplexity corpus (mean, median, p99, top-1 agreement) unless KL is off;
* size: parameters (and non-zero parameters), bytes of the saved checkpoint (`slimlm.export.native.save`
  into a temporary folder, weights and configs, tokenizer files left out), bits per original parameter;
* cost: compression wall time and the peak RSS of the compression (`CompressionReport`);
* speed: prefill and decode tokens/s through slimlm's generation engine (quantized kernels where the layers
  have them), measured in alternating pairs against the float model in the same process, medians of the
  repeats; the ratio to float is the number to read, the absolute speeds depend on the machine's load.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from slimlm.errors import SlimlmError


def measure_row(spec: dict) -> dict:
    """The row for `spec` (see `slimlm.report.sweep.row_spec`): a dict of plain JSON values."""
    import torch

    from slimlm.compress import calibration_tokens, compress, load_recipe, with_calibration
    from slimlm.eval.efficiency import count_nonzero_parameters, count_parameters
    from slimlm.models.loading import load_model

    def load():
        return load_model(spec["model"], dtype=spec["dtype"], device=spec["device"],
                          trust_remote_code=spec["trust_remote_code"])

    torch.manual_seed(spec["seed"])
    loaded = load()
    model, tokenizer = loaded.model, loaded.tokenizer
    parameters_before = count_parameters(model)
    row: dict = {"compression_seconds": None, "peak_rss_bytes": None, "structure": []}
    if spec["recipe"] is not None:
        recipe = with_calibration(load_recipe(spec["recipe"]), **spec["calibration"])
        _say(spec, "compressing")
        calibration = calibration_tokens(recipe, tokenizer, spec["data_dir"])
        report = compress(model, recipe, calibration, device=spec["device"])
        row.update(compression_seconds=report.seconds, peak_rss_bytes=report.peak_rss_bytes, notes=report.notes,
                   structure=[{k: v for k, v in change.items() if not isinstance(v, (dict, list))}
                              for change in report.structure])
    row.update(parameters_before=parameters_before, parameters=count_parameters(model),
               nonzero_parameters=count_nonzero_parameters(model), disk_bytes=_saved_bytes(model))
    row["bits_per_parameter"] = 8 * row["disk_bytes"] / parameters_before
    # The float model again, for KL and the speed pairs: loaded after compression so that the compression's
    # peak memory is the method's own, not the method's plus a spare copy.
    reference = load().model if spec["recipe"] is not None else None
    _say(spec, "evaluating")
    row["quality"] = _quality(model, tokenizer, reference if spec["kl"] else None, spec)
    _say(spec, "measuring speed")
    row["speed"] = _speed(model, reference, spec["speed"])
    return row


def _say(spec: dict, phase: str) -> None:
    print(f"slimlm compare: {spec['name']}: {phase}", file=sys.stderr, flush=True)


def _saved_bytes(model) -> int:
    """Bytes of the checkpoint slimlm writes for `model` (weights and configs)."""
    from slimlm.export.native import model_bytes, save

    with tempfile.TemporaryDirectory(prefix="slimlm-compare-") as directory:
        save(model, Path(directory) / "model", overwrite=True)
        return model_bytes(Path(directory) / "model")


def _quality(model, tokenizer, reference, spec: dict) -> list[dict]:
    from slimlm.eval.runner import EvalSettings, evaluate

    e = spec["eval"]
    settings = EvalSettings(e["seqlen"], e["max_windows"], e["limit"], e["batch_size"], spec["data_dir"])
    rows = evaluate(model, tokenizer, e["tasks"], settings, reference)
    kept = ("kl_median", "kl_p99", "kl_max")
    return [{**{k: v for k, v in row.items() if k != "details"},
             **{k: row["details"][k] for k in kept if row["metric"] == "kl_mean" and k in row["details"]}}
            for row in rows]


def _speed(model, reference, settings: dict) -> dict:
    """Prefill and decode tokens/s of `model` through slimlm's engine, and of `reference` (the float model)
    in alternating runs when there is one; medians over `repeats`."""
    import torch

    from slimlm.infer.engine import generate_ids
    from slimlm.quant.kernels import last_decode_paths

    vocab = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(0)
    prompt = [torch.randint(0, vocab, (settings["prompt_tokens"],), generator=generator).tolist()]
    models = {"compressed": model} if reference is None else {"compressed": model, "float": reference}
    timings: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    for name, m in models.items():  # warm-up: the first call allocates and picks kernels
        generate_ids(m, [prompt[0][:8]], 2)
    for _ in range(settings["repeats"]):
        for name, m in models.items():
            stats = generate_ids(m, prompt, settings["new_tokens"]).stats
            timings[name].append((settings["prompt_tokens"] / stats.time_to_first_token_s,
                                  stats.decode_steps / stats.decode_s))
    out = {**settings, "kernels": last_decode_paths(model) or "float", "threads": torch.get_num_threads()}
    for name, pairs in timings.items():
        prefix = "" if name == "compressed" else "float_"
        out[prefix + "prefill_tokens_per_s"] = statistics.median(p for p, _ in pairs)
        out[prefix + "decode_tokens_per_s"] = statistics.median(d for _, d in pairs)
    if reference is None:  # the float row is its own reference
        out.update(float_prefill_tokens_per_s=out["prefill_tokens_per_s"],
                   float_decode_tokens_per_s=out["decode_tokens_per_s"])
    out["prefill_speedup"] = out["prefill_tokens_per_s"] / out["float_prefill_tokens_per_s"]
    out["decode_speedup"] = out["decode_tokens_per_s"] / out["float_decode_tokens_per_s"]
    return out


def main(argv: list[str]) -> int:
    from slimlm.cli import quiet_libraries
    from slimlm.results import atomic_write_text

    quiet_libraries()
    spec_path, out_path = argv
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    start = time.perf_counter()
    try:
        row = {"status": "ok", **measure_row(spec)}
    except SlimlmError as error:
        row = {"status": "failed", "error": str(error)}
    row["row_seconds"] = time.perf_counter() - start
    atomic_write_text(out_path, json.dumps(row, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
