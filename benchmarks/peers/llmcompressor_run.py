#!/usr/bin/env python
"""Run llm-compressor on the same model, calibration tokens and perplexity windows as slimlm.

Runs inside the venv made by `benchmarks/peers/setup_llmcompressor.sh`; it never imports slimlm.
slimlm writes the token files, so both tools see identical tokens:

    benchmarks/peers/.venv-llmcompressor/bin/python benchmarks/peers/llmcompressor_run.py \
        --model DIR --calib calib.safetensors --eval eval.safetensors \
        --scheme W4G64 --algo gptq [--actorder [static|group]] [--symmetric|--asymmetric] \
        [--dampening 0.01] [--eval-float] [--save DIR] [--dump-weights FILE] [--threads N] --out result.json

- `--model`: a plain Hugging Face float32 checkpoint directory (safetensors + tokenizer).
- `--calib`: safetensors with one int64 tensor `input_ids` of shape (N, L): calibration segments.
- `--eval`: safetensors with `input_ids` of shape (W, S): perplexity windows (GPTQ protocol).
- `--scheme`: `W<bits>G<group>` (e.g. W4G64, W3G64, W4G128, W2G32) or `W<bits>CH` (per channel).
  Weight-only integer quantization of every Linear except lm_head; symmetric unless --asymmetric.
- `--algo gptq`: GPTQModifier (block_size 128, dampening_frac from --dampening); `--algo rtn`:
  QuantizationModifier with the same scheme (round to nearest, min-max scales).
- `--algo sparsegpt` / `--algo wanda`: SparseGPTModifier (block_size, dampening_frac) or
  WandaPruningModifier with `--sparsity S` and `--mask-structure N:M` (0:0 = unstructured) on
  every Linear except lm_head; `--scheme` is not used.
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
llm-compressor, seconds spent evaluating).

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
    p.add_argument("--algo", required=True, choices=["gptq", "rtn", "sparsegpt", "wanda"])
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
    if args.algo == "rtn" and args.actorder is not None:
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


def build_recipe(args):
    if args.pruning:
        common = {"sparsity": args.sparsity, "mask_structure": args.mask_structure, "targets": ["Linear"],
                  "ignore": ["re:.*lm_head"]}
        if args.algo == "sparsegpt":
            from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier

            return SparseGPTModifier(**common, block_size=args.block_size, dampening_frac=args.dampening)
        from llmcompressor.modifiers.pruning.wanda import WandaPruningModifier

        return WandaPruningModifier(**common)
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

    return QuantizationModifier(config_groups=config_groups, ignore=["lm_head"])


def recipe_summary(args) -> dict:
    if args.pruning:
        return {"modifier": "SparseGPTModifier" if args.algo == "sparsegpt" else "WandaPruningModifier",
                "sparsity": args.sparsity, "mask_structure": args.mask_structure, "targets": ["Linear"],
                "ignore": ["lm_head"],
                **({"block_size": args.block_size, "dampening_frac": args.dampening} if args.algo == "sparsegpt" else {})}
    return {
        "modifier": "GPTQModifier" if args.algo == "gptq" else "QuantizationModifier",
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

    try:
        t = time.perf_counter()
        result["ppl"] = perplexity(model, windows)
        result["eval_seconds"] = time.perf_counter() - t
        print(f"compressed ppl {result['ppl']:.4f} ({result['eval_seconds']:.1f}s)", flush=True)
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
