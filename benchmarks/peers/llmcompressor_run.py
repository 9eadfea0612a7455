#!/usr/bin/env python
"""Run llm-compressor on the same model, calibration tokens and perplexity windows as slimlm.

Runs inside the venv made by `benchmarks/peers/setup_llmcompressor.sh`; it never imports slimlm.
slimlm writes the token files, so both tools see identical tokens:

    benchmarks/peers/.venv-llmcompressor/bin/python benchmarks/peers/llmcompressor_run.py \
        --model DIR --calib calib.safetensors --eval eval.safetensors \
        --scheme W4G64 --algo gptq [--actorder [static|group]] [--symmetric|--asymmetric] \
        [--dampening 0.01] [--eval-float] [--save DIR] [--dump-weights FILE] [--threads N] --out result.json
    benchmarks/peers/.venv-llmcompressor/bin/python benchmarks/peers/llmcompressor_run.py \
        --model DIR --calib calib.safetensors --eval eval.safetensors \
        --algo smoothquant [--smoothing-strength 0.5] --out result.json      # or --algo w8a8

- `--model`: a plain Hugging Face float32 checkpoint directory (safetensors + tokenizer).
- `--calib`: safetensors with one int64 tensor `input_ids` of shape (N, L): calibration segments.
- `--eval`: safetensors with `input_ids` of shape (W, S): perplexity windows (GPTQ protocol).
- `--scheme`: `W<bits>G<group>` (e.g. W4G64, W3G64, W4G128, W2G32) or `W<bits>CH` (per channel).
  Weight-only integer quantization of every Linear except lm_head; symmetric unless --asymmetric.
- `--algo gptq`: GPTQModifier (block_size 128, dampening_frac from --dampening); `--algo rtn`:
  QuantizationModifier with the same scheme (round to nearest, min-max scales).
- `--algo awq`: AWQModifier (duo_scaling=False: scales from activations alone, as the paper; n_grid 20;
  llm-compressor has no clipping search), then QuantizationModifier with the scheme.
- `--algo sparsegpt` / `--algo wanda`: SparseGPTModifier (block_size, dampening_frac) or
  WandaPruningModifier with `--sparsity S` and `--mask-structure N:M` (0:0 = unstructured) on
  every Linear except lm_head; `--scheme` is not used.
- `--algo smoothquant`: SmoothQuantModifier (smoothing_strength from --smoothing-strength, default
  0.5; mappings left to llm-compressor, which infers them from the architecture: for Llama
  input_layernorm -> q/k/v_proj and post_attention_layernorm -> gate/up_proj; they are printed and
  recorded), then QuantizationModifier with compressed-tensors' preset scheme "W8A8" (int8
  symmetric per-channel weights, min-max; int8 symmetric dynamic per-token input activations) on
  every Linear except lm_head: slimlm's `smoothquant-w8a8`. `--algo w8a8`: the same
  QuantizationModifier without smoothing (naive RTN W8A8, slimlm's `rtn-w8a8`). `--scheme` is not
  used (the scheme is fixed, recorded as "W8A8"); --asymmetric and --actorder are refused.
  After the evaluation, the result's `activation_check` records that the input activations really
  were fake-quantized in the evaluated forward (one Linear's output on a captured input compared
  with a weight-only and a weight+activation recomputation).
- `--actorder`: activation ordering for GPTQ. Bare `--actorder` means "static" (llm-compressor's
  WEIGHT ordering: columns processed by descending Hessian diagonal, each column keeps the scale
  of its original group). "group" (dynamic groups, g_idx) is deprecated in llm-compressor 0.14 and
  refused by its GPTQ. Without the flag no reordering is done (llm-compressor's own default would
  be "static": this script always passes its choice explicitly).

`--dump-weights FILE`: after compression, write every compressed Linear's weight (float32, the model's
parameter names) to a safetensors file, so another tool's masks can be compared with these.

Perplexity: for each window, logits = model(window[None]).logits[0];
nll += cross_entropy(logits[:-1], window[1:], reduction="sum"); ppl = exp(nll / (W * (S - 1))).

Result JSON (written atomically): tool, versions, scheme, algo, actorder, symmetric, calibration,
eval, ppl, ppl_float, compression_seconds (the `oneshot` call alone), peak_rss_bytes, status
("ok" | "refused" | "failed"), error, plus details (recipe, threads, warnings logged by
llm-compressor, seconds spent evaluating); for smoothquant/w8a8 also smoothing_strength,
smoothquant_mappings (as llm-compressor inferred them), smoothed_layers (the norms it reports
smoothing; none is a failure) and activation_check (a failed check is a failure).

Exit status: 0 for "ok" and "refused" (llm-compressor declined the configuration, e.g. a group
size that does not divide a layer's input width), 1 for "failed", 2 for bad arguments or inputs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import resource
import sys
import tempfile
import time
import traceback
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

SCHEME_RE = re.compile(r"^W(?P<bits>\d+)(?:G(?P<group>\d+)|(?P<ch>CH))$", re.IGNORECASE)

# Messages by which llm-compressor / compressed-tensors decline a configuration (vs. crashing).
REFUSAL_PATTERNS = (
    "not divisible by group_size",
    "columns % group_size",
    "Invalid activation ordering",
    "Cannot resolve activation ordering",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="Hugging Face checkpoint directory (float32, with tokenizer)")
    p.add_argument("--calib", required=True, help="safetensors file with int64 input_ids (N, L)")
    p.add_argument("--eval", required=True, dest="eval_file", help="safetensors file with int64 input_ids (W, S)")
    p.add_argument("--scheme", default=None, help="W<bits>G<group> or W<bits>CH, e.g. W4G64 (quantization only)")
    p.add_argument("--algo", required=True, choices=["gptq", "rtn", "awq", "sparsegpt", "wanda", "smoothquant", "w8a8"])
    p.add_argument("--smoothing-strength", type=float, default=0.5,
                   help="smoothquant: SmoothQuantModifier smoothing_strength (alpha, default 0.5)")
    p.add_argument("--sparsity", type=float, default=0.5, help="pruning: fraction of weights removed")
    p.add_argument("--mask-structure", default="0:0", help="pruning: N:M pattern, 0:0 = unstructured")
    p.add_argument(
        "--actorder",
        nargs="?",
        const="static",
        default=None,
        choices=["static", "weight", "group", "dynamic"],
        help="GPTQ activation ordering; bare flag = static; absent = none",
    )
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--symmetric", dest="symmetric", action="store_true", default=True, help="(default)")
    sym.add_argument("--asymmetric", dest="symmetric", action="store_false")
    p.add_argument("--dampening", type=float, default=0.01, help="GPTQ dampening_frac (default 0.01)")
    p.add_argument("--block-size", type=int, default=128, help="GPTQ block size (default 128)")
    p.add_argument("--eval-float", action="store_true", help="also evaluate the uncompressed model")
    p.add_argument("--save", default=None, help="save the compressed model (compressed-tensors format) here")
    p.add_argument("--dump-weights", default=None, help="write the compressed linears' float32 weights here")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--out", required=True, help="result JSON path")
    args = p.parse_args(argv)
    args.pruning = args.algo in ("sparsegpt", "wanda")
    args.w8a8 = args.algo in ("smoothquant", "w8a8")
    if args.w8a8:
        # Fixed preset "W8A8": int8 symmetric per-channel weights, int8 dynamic per-token activations.
        if not 0 <= args.smoothing_strength <= 1:
            p.error("--smoothing-strength must lie in [0, 1]")
        if not args.symmetric:
            p.error(f"--algo {args.algo} uses the symmetric W8A8 preset; --asymmetric is not supported")
        if args.actorder is not None:
            p.error("--actorder applies to --algo gptq only")
        args.scheme = "W8A8"
        args.bits, args.group_size, args.symmetric = 8, None, True
        return args
    if args.pruning:
        if not 0 < args.sparsity < 1:
            p.error("--sparsity must lie in (0, 1)")
        if not re.fullmatch(r"\d+:\d+", args.mask_structure):
            p.error("--mask-structure must look like 2:4 (or 0:0)")
        args.bits = args.group_size = None
        args.symmetric = None
        return args
    if args.scheme is None:
        p.error(f"--algo {args.algo} needs --scheme")
    m = SCHEME_RE.match(args.scheme)
    if not m:
        p.error(f"--scheme {args.scheme!r}: expected W<bits>G<group> (e.g. W4G64) or W<bits>CH")
    args.bits = int(m.group("bits"))
    args.group_size = None if m.group("ch") else int(m.group("group"))
    if not 1 <= args.bits <= 8:
        p.error(f"--scheme {args.scheme!r}: bits must be 1..8")
    if args.group_size is not None and args.group_size < 1:
        p.error(f"--scheme {args.scheme!r}: group size must be positive")
    if args.actorder in ("weight",):
        args.actorder = "static"
    if args.actorder == "dynamic":
        args.actorder = "group"
    if args.algo in ("rtn", "awq") and args.actorder is not None:
        p.error("--actorder applies to --algo gptq only")
    if not 0 < args.dampening < 1:
        p.error("--dampening must lie in (0, 1)")
    return args


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("llmcompressor", "compressed-tensors", "transformers", "torch", "datasets", "accelerate"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def peak_rss_bytes() -> int:
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def write_json_atomic(path: str, payload: dict) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def load_tokens(path: str, what: str):
    import torch
    from safetensors.torch import load_file

    tensors = load_file(path)
    if "input_ids" not in tensors:
        raise ValueError(f"{what} file {path} has no 'input_ids' tensor (has {sorted(tensors)})")
    ids = tensors["input_ids"]
    if ids.dtype != torch.int64 or ids.dim() != 2 or ids.shape[0] < 1 or ids.shape[1] < 2:
        raise ValueError(
            f"{what} file {path}: input_ids must be int64 of shape (N, L>=2), got {ids.dtype} {tuple(ids.shape)}"
        )
    return ids


def dump_weights(model, path: str) -> None:
    """Every Linear's weight except lm_head's, float32, atomically (temp file, then rename)."""
    import torch
    from safetensors.torch import save_file

    weights = {f"{name}.weight": module.weight.detach().float().cpu().contiguous()
               for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")}
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp")
    save_file(weights, str(tmp))
    os.replace(tmp, target)


def perplexity(model, windows) -> float:
    """exp(mean token NLL) over the windows, each scored alone (GPTQ protocol)."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    total = 0.0
    with torch.no_grad():
        for window in windows:
            w = window.to(device)
            logits = model(input_ids=w[None], use_cache=False).logits[0].float()
            total += F.cross_entropy(logits[:-1], w[1:], reduction="sum").item()
    count = windows.shape[0] * (windows.shape[1] - 1)
    return math.exp(total / count)


def activation_check(model, windows, tokens: int = 64) -> dict:
    """Show that the evaluated forward fake-quantizes the input activations (W8A8 algos).

    Captures the input and output of the first quantized Linear during one model forward (the same
    in-memory forward that perplexity() uses) and recomputes the output (a) from the fake-quantized
    weight and the raw input (weight-only W8) and (b) from the fake-quantized weight and the input
    quantized per token, symmetric int8, by an independent reimplementation of compressed-tensors'
    rule (scale = max|x| / 127.5 per token, codes clamped to [-128, 127]). With activation
    quantization active, the output matches (b) and not (a). Also counts the quantized Linears by
    quantization status and whether their scheme has dynamic input activations."""
    import torch
    import torch.nn.functional as F
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    counts: dict[str, int] = {}
    target = target_name = None
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None or not isinstance(module, torch.nn.Linear):
            continue
        acts = scheme.input_activations
        status = getattr(module, "quantization_status", None)
        dynamic = acts is not None and acts.dynamic
        key = f"{getattr(status, 'value', status)}/" + (
            f"dynamic-{acts.strategy}-{acts.num_bits}bit" if dynamic else "no-input-quant")
        key += "/enabled" if getattr(module, "quantization_enabled", True) else "/DISABLED"
        counts[key] = counts.get(key, 0) + 1
        if target is None:
            target, target_name = module, name
    if target is None:
        return {"ok": False, "reason": "no quantized Linear found", "linears": counts}

    captured = {}

    def hook(_module, inputs, output):
        captured["x"] = inputs[0].detach().clone()
        captured["y"] = output.detach().clone()

    handle = target.register_forward_hook(hook)
    try:
        device = next(model.parameters()).device
        with torch.no_grad():
            model(input_ids=windows[0, :tokens][None].to(device), use_cache=False)
    finally:
        handle.remove()
    x, y = captured["x"], captured["y"]
    with torch.no_grad():
        w_q = forward_quantize(target, target.weight.data, "weight", target.quantization_scheme.weights)
        bias = target.bias
        scale = x.abs().amax(dim=-1, keepdim=True) / 127.5
        x_q = torch.clamp(torch.round(x / scale), -128, 127) * scale
        y_weight_only = F.linear(x, w_q, bias)
        y_w8a8 = F.linear(x_q, w_q, bias)
    ref = y.abs().max().item()
    diff_weight_only = (y - y_weight_only).abs().max().item() / ref
    diff_w8a8 = (y - y_w8a8).abs().max().item() / ref
    return {
        "ok": bool(diff_w8a8 < 1e-4 and diff_weight_only > 10 * max(diff_w8a8, 1e-7)),
        "linear": target_name,
        "tokens": int(x.shape[1]) if x.dim() == 3 else int(x.shape[0]),
        "max_rel_diff_vs_weight_only": diff_weight_only,
        "max_rel_diff_vs_w8a8_recomputed": diff_w8a8,
        "linears": counts,
    }


def build_recipe(args):
    if args.pruning:
        common = {"sparsity": args.sparsity, "mask_structure": args.mask_structure, "targets": ["Linear"],
                  "ignore": ["re:.*lm_head"]}
        if args.algo == "sparsegpt":
            from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier

            return SparseGPTModifier(**common, block_size=args.block_size, dampening_frac=args.dampening)
        from llmcompressor.modifiers.pruning.wanda import WandaPruningModifier

        return WandaPruningModifier(**common)
    if args.w8a8:
        from llmcompressor.modifiers.quantization import QuantizationModifier

        # The preset name is resolved by compressed-tensors (preset_name_to_scheme("W8A8", ["Linear"])).
        quantize = QuantizationModifier(targets=["Linear"], scheme="W8A8", ignore=["lm_head"])
        if args.algo == "w8a8":
            return [quantize]
        from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

        # mappings=None: llm-compressor infers them from the model class (printed by main()).
        return [SmoothQuantModifier(smoothing_strength=args.smoothing_strength), quantize]
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    weights = QuantizationArgs(
        num_bits=args.bits,
        type="int",
        symmetric=args.symmetric,
        strategy="channel" if args.group_size is None else "group",
        group_size=args.group_size,
    )
    config_groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}
    if args.algo == "gptq":
        from llmcompressor.modifiers.gptq import GPTQModifier

        return GPTQModifier(
            config_groups=config_groups,
            ignore=["lm_head"],
            block_size=args.block_size,
            dampening_frac=args.dampening,
            actorder=args.actorder,  # None explicitly: llm-compressor's default would be "static"
        )
    from llmcompressor.modifiers.quantization import QuantizationModifier

    quantize = QuantizationModifier(config_groups=config_groups, ignore=["lm_head"])
    if args.algo == "awq":
        from llmcompressor.modifiers.transform.awq import AWQModifier

        # duo_scaling=False: the paper's s = s_X^alpha from activations alone; llm-compressor has no clipping search.
        return [AWQModifier(duo_scaling=False, n_grid=20), quantize]
    return quantize


def w8a8_scheme_summary() -> dict:
    """The preset "W8A8" as compressed-tensors defines it (read from the installed package)."""
    from compressed_tensors.quantization import preset_name_to_scheme

    scheme = preset_name_to_scheme("W8A8", ["Linear"])
    keys = ("num_bits", "type", "symmetric", "strategy", "group_size", "dynamic", "observer")

    def args_dict(qargs, default_observer: str):
        if qargs is None:
            return None
        out = {k: (v.value if hasattr(v, "value") else v) for k, v in qargs.model_dump().items() if k in keys}
        if out.get("observer") is None:
            out["observer"] = default_observer
        return out

    return {"weights": args_dict(scheme.weights, "default (memoryless_minmax)"),
            "input_activations": args_dict(scheme.input_activations,
                                           "none (dynamic: per-token min-max at run time)"),
            "output_activations": args_dict(scheme.output_activations, "default")}


def recipe_summary(args) -> dict:
    if args.w8a8:
        quantize = {"modifier": "QuantizationModifier", "scheme": "W8A8 (compressed-tensors preset)",
                    "targets": ["Linear"], "ignore": ["lm_head"], **w8a8_scheme_summary()}
        if args.algo == "w8a8":
            return {"modifiers": [quantize]}
        smooth = {"modifier": "SmoothQuantModifier", "smoothing_strength": args.smoothing_strength,
                  "mappings": "inferred by llm-compressor (see smoothquant_mappings)"}
        return {"modifiers": [smooth, quantize]}
    if args.pruning:
        return {"modifier": "SparseGPTModifier" if args.algo == "sparsegpt" else "WandaPruningModifier",
                "sparsity": args.sparsity, "mask_structure": args.mask_structure, "targets": ["Linear"],
                "ignore": ["lm_head"],
                **({"block_size": args.block_size, "dampening_frac": args.dampening} if args.algo == "sparsegpt" else {})}
    return {
        "modifier": {"gptq": "GPTQModifier", "awq": "AWQModifier(duo_scaling=False, n_grid=20) + QuantizationModifier"}.get(
            args.algo, "QuantizationModifier"),
        "targets": ["Linear"],
        "ignore": ["lm_head"],
        "weights": {
            "num_bits": args.bits,
            "type": "int",
            "symmetric": args.symmetric,
            "strategy": "channel" if args.group_size is None else "group",
            "group_size": args.group_size,
            "observer": "default (minmax)",
        },
        **(
            {"block_size": args.block_size, "dampening_frac": args.dampening, "actorder": args.actorder}
            if args.algo == "gptq"
            else {}
        ),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)

    result: dict = {
        "tool": "llm-compressor",
        "versions": versions(),
        "scheme": args.scheme.upper() if args.scheme else None,
        "sparsity": args.sparsity if args.pruning else None,
        "mask_structure": args.mask_structure if args.pruning else None,
        "algo": args.algo,
        "actorder": args.actorder,
        "symmetric": args.symmetric,
        "bits": args.bits,
        "group_size": args.group_size,
        "dampening": args.dampening if args.algo in ("gptq", "sparsegpt") else None,
        "smoothing_strength": args.smoothing_strength if args.algo == "smoothquant" else None,
        "model": str(Path(args.model).resolve()),
        "calibration": None,
        "eval": None,
        "ppl": None,
        "ppl_float": None,
        "compression_seconds": None,
        "peak_rss_bytes": None,  # whole process, at the end (loading, evaluation and oneshot)
        "peak_rss_bytes_after_oneshot": None,
        "status": "failed",
        "error": None,
        "recipe": recipe_summary(args),
        "threads": torch.get_num_threads(),
        # oneshot compresses on an accelerator when one is visible, else on the CPU
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "warnings": [],
        "eval_seconds": None,
        "eval_float_seconds": None,
        "saved_to": None,
        "weights_dumped_to": None,
    }
    if args.w8a8:
        result["activation_check"] = None
    if args.algo == "smoothquant":
        result["smoothquant_mappings"] = None  # [[balance layers], smooth layer], as llm-compressor infers them
        result["smoothed_layers"] = []  # the norms llm-compressor reports smoothing ("Smoothing with ...")

    def finish(status: str, error: str | None = None, code: int = 0) -> int:
        if error:
            lines = error.splitlines()
            if len(lines) > 14:  # the divisibility refusal lists every layer
                error = "\n".join(lines[:12] + [f"  ... ({len(lines) - 12} more lines)"])
        if status == "refused":
            result["compression_seconds"] = None  # nothing was compressed
        result["status"] = status
        result["error"] = error
        result["peak_rss_bytes"] = peak_rss_bytes()
        write_json_atomic(args.out, result)
        summary = {k: result[k] for k in ("status", "scheme", "algo", "ppl", "ppl_float", "compression_seconds")}
        print(json.dumps(summary), flush=True)
        if error:
            print(f"llmcompressor_run: {status}: {error.splitlines()[0] if error else ''}", file=sys.stderr)
        return code

    try:
        calib = load_tokens(args.calib, "calibration")
        windows = load_tokens(args.eval_file, "eval")
    except Exception as exc:  # bad inputs: still leave a result behind
        return finish("failed", f"{type(exc).__name__}: {exc}", code=2)
    n, seqlen = calib.shape
    result["calibration"] = {"samples": int(n), "seqlen": int(seqlen), "file": str(Path(args.calib).resolve())}
    result["eval"] = {
        "windows": int(windows.shape[0]),
        "seqlen": int(windows.shape[1]),
        "tokens_scored": int(windows.shape[0] * (windows.shape[1] - 1)),
        "file": str(Path(args.eval_file).resolve()),
    }

    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        model.eval()
    except Exception as exc:
        return finish("failed", f"loading {args.model}: {type(exc).__name__}: {exc}", code=2)

    if args.eval_float:
        t = time.perf_counter()
        try:
            result["ppl_float"] = perplexity(model, windows)
        except Exception as exc:
            return finish("failed", f"float evaluation: {type(exc).__name__}: {exc}\n{traceback.format_exc()}", code=1)
        result["eval_float_seconds"] = time.perf_counter() - t
        print(f"float ppl {result['ppl_float']:.4f} ({result['eval_float_seconds']:.1f}s)", flush=True)

    dataset = Dataset.from_dict(
        {"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()}
    )

    from llmcompressor import oneshot  # configures loguru on import (removes earlier sinks)
    from loguru import logger

    def keep_warning(msg) -> None:
        # e.g. GPTQ falling back to RTN for a module whose Hessian inversion failed
        text = msg.record["message"][:2000]
        if text not in result["warnings"]:
            result["warnings"].append(text)

    # METRIC (level 38) lines are llm-compressor's per-module GPTQ losses, not warnings.
    logger.add(keep_warning, level="WARNING", filter=lambda r: r["level"].name in ("WARNING", "ERROR", "CRITICAL"))
    if args.algo == "smoothquant":
        from llmcompressor.modifiers.transform.smoothquant.dynamic_mappings import get_layer_mappings_from_model

        # The same call SmoothQuantModifier makes when no mappings are given.
        mappings = [[list(m.balance_layers), m.smooth_layers] for m in get_layer_mappings_from_model(model)]
        result["smoothquant_mappings"] = mappings
        print(f"SmoothQuant mappings for {type(model).__name__} (llm-compressor's): {json.dumps(mappings)}",
              flush=True)

        def keep_smoothed(msg) -> None:
            text = msg.record["message"]
            if text.startswith("Smoothing with "):
                result["smoothed_layers"].append(text.removeprefix("Smoothing with "))

        logger.add(keep_smoothed, level="INFO")

    try:
        recipe = build_recipe(args)
    except Exception as exc:
        msg = f"{type(exc).__name__}: {exc}"
        status = "refused" if any(p in msg for p in REFUSAL_PATTERNS) else "failed"
        return finish(status, msg, code=0 if status == "refused" else 1)

    t = time.perf_counter()
    try:
        model = oneshot(
            model=model,
            tokenizer=tokenizer,
            dataset=dataset,
            recipe=recipe,
            num_calibration_samples=int(n),
            max_seq_length=int(seqlen),
            shuffle_calibration_samples=False,  # same segment order as slimlm (the Hessian sum does not care)
        )
    except Exception as exc:
        result["compression_seconds"] = time.perf_counter() - t
        msg = f"{type(exc).__name__}: {exc}"
        if any(p in msg for p in REFUSAL_PATTERNS):
            return finish("refused", msg, code=0)
        return finish("failed", msg + "\n" + traceback.format_exc(), code=1)
    result["compression_seconds"] = time.perf_counter() - t
    result["peak_rss_bytes_after_oneshot"] = peak_rss_bytes()
    print(f"oneshot {result['compression_seconds']:.1f}s", flush=True)
    if args.algo == "smoothquant":
        print(f"smoothed {len(result['smoothed_layers'])} norms", flush=True)
        if not result["smoothed_layers"]:
            return finish("failed", "SmoothQuantModifier smoothed no layer (its mappings matched nothing)", code=1)

    try:
        t = time.perf_counter()
        result["ppl"] = perplexity(model, windows)
        result["eval_seconds"] = time.perf_counter() - t
        print(f"compressed ppl {result['ppl']:.4f} ({result['eval_seconds']:.1f}s)", flush=True)
        if args.w8a8:
            result["activation_check"] = activation_check(model, windows)
            print(f"activation check: {json.dumps(result['activation_check'])}", flush=True)
            if not result["activation_check"]["ok"]:
                return finish("failed", "input activations are not fake-quantized in the evaluated forward: "
                              + json.dumps(result["activation_check"]), code=1)
        if args.dump_weights:
            dump_weights(model, args.dump_weights)
            result["weights_dumped_to"] = str(Path(args.dump_weights).resolve())
        if args.save:
            # Saving packs the weights in place, so it comes after the evaluation.
            model.save_pretrained(args.save, save_compressed=True)
            tokenizer.save_pretrained(args.save)
            result["saved_to"] = str(Path(args.save).resolve())
    except Exception as exc:
        return finish("failed", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}", code=1)
    return finish("ok")


if __name__ == "__main__":
    sys.exit(main())
