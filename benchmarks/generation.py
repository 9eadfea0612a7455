"""Generation benchmark: latency and throughput, KV-cache memory, speculative decoding, attention sinks.

Writes `benchmarks/results/generation.{json,md}` (`--quick`: `generation-quick.*`, a small protocol
to check the script, about 90 s on 2 cores). Model: SmolLM2-135M float32 (`--model`); text: the embedded
`pydoc` corpus (evaluation split), so no data directory is needed.

1. Latency (slimlm's runner, contiguous cache, greedy, no EOS stop): time to first token (prefill +
   first sample), per-token decode latency, tokens/s at batch 1 and 8, for float32 and the
   compressed variants (RTN W4 g64 with slimlm's quantized linears; layer removal by ShortGPT's
   block influence), beside transformers' own `generate` on the float model as a reference.
2. KV memory: bytes per token, and bytes held / wasted on a mixed-length batch of 8 prompts for the
   contiguous cache (padded to the longest), the paged cache (16-token blocks) and the sinks cache.
3. Speculative decoding (greedy, so the output must equal plain greedy decoding: checked): drafts
   made from the target by layer removal (ShortGPT block influence; `--draft-drop`), gamma 2/4/6 and
   adaptive, against plain decoding of the same
   prompt; acceptance rate, tokens per target forward, speedup. Beside it the cost model of
   Leviathan et al. (Sec. 3.3): with acceptance alpha and cost ratio c = draft step / target step,
   expected speedup = (1 - alpha^(gamma+1)) / ((1 - alpha)(gamma c + T(gamma+1)/T(1))), using the
   measured time T(k) of a target forward over k tokens; it shows why a measured speedup is or is not > 1.
4. Attention sinks: perplexity of a text several times longer than the cache, fed one token at a
   time, with 4 sinks + window, with window eviction only (same cache size), and in context (one
   full forward over the whole text). Reported over all tokens and over the tokens after the cache
   first fills (where the three differ).

llama.cpp is not run: `llama-cpp-python` is not installed here and building it from source was not
attempted (see docs/generation.md).

    python benchmarks/generation.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import math
import shlex
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def options() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--draft-drop", default="4,20",
                        help="comma-separated: blocks removed from the target to make each draft")
    parser.add_argument("--window", type=int, default=252, help="sinks experiment: recent-token window")
    parser.add_argument("--stream-tokens", type=int, default=2048, help="sinks experiment: text length")
    parser.add_argument("--quick", action="store_true", help="small protocol to check the script (about 90 s)")
    parser.add_argument("--out", default=str(RESULTS / "generation"))
    args = parser.parse_args()
    if args.quick:
        args.prompt_tokens, args.new_tokens, args.repeats, args.window, args.stream_tokens = 32, 8, 1, 28, 160
        args.out = args.out + "-quick" if Path(args.out).parent == RESULTS else args.out
    return args


def median_run(function, repeats: int):
    """Run `function` `repeats` times; return the result of the run with the median total time."""
    runs = sorted((function() for _ in range(repeats)), key=lambda r: r[0])
    return runs[len(runs) // 2]


def latency_rows(variants: dict, text_ids, args) -> list[dict]:
    import torch

    from slimlm.infer import generate_ids

    rows = []
    for batch in (1, 8):
        prompts = [text_ids[i * args.prompt_tokens:(i + 1) * args.prompt_tokens].tolist() for i in range(batch)]
        for name, model in variants.items():
            def ours():
                result = generate_ids(model, prompts, args.new_tokens)
                return result.stats.total_s, result.stats
            _, stats = median_run(ours, args.repeats)
            rows.append({"engine": "slimlm", "model": name, "batch": batch, "prompt_tokens": args.prompt_tokens,
                         "new_tokens": args.new_tokens, "ttft_s": stats.time_to_first_token_s,
                         "per_token_s": stats.per_token_s, "tokens_per_s": stats.tokens_per_s})
        reference = variants["float32"]

        def transformers_generate():
            ids = torch.tensor(prompts)
            start = time.perf_counter()
            with torch.no_grad():
                reference.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
                first = time.perf_counter() - start
                reference.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                   do_sample=False)
            total = time.perf_counter() - start - first
            return total, first
        total, first = median_run(transformers_generate, args.repeats)
        rows.append({"engine": "transformers generate", "model": "float32", "batch": batch,
                     "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "ttft_s": first,
                     "per_token_s": (total - first) / max(1, args.new_tokens - 1),
                     "tokens_per_s": batch * args.new_tokens / total})
    return rows


def memory_rows(model, text_ids, args) -> list[dict]:
    from slimlm.infer import CacheSettings, generate_ids

    lengths = [16, 40, 64, 100, 128, 180, 220, 256] if not args.quick else [4, 10, 16, 24, 32, 40, 50, 64]
    prompts = [text_ids[:n].tolist() for n in lengths]
    new = 4
    rows = []
    for settings in (CacheSettings("contiguous"), CacheSettings("paged", block_size=16),
                     CacheSettings("sinks", sink_tokens=4, window=args.window)):
        stats = generate_ids(model, prompts, new, cache=settings).stats
        used = stats.kv_bytes_held - stats.kv_bytes_wasted
        rows.append({"cache": settings.kind, "prompt_lengths": ",".join(map(str, lengths)), "new_tokens": new,
                     "kv_bytes_per_token": stats.kv_bytes_per_token, "kv_bytes_held": stats.kv_bytes_held,
                     "kv_bytes_used": used, "kv_bytes_wasted": stats.kv_bytes_wasted,
                     "wasted_fraction": stats.kv_bytes_wasted / stats.kv_bytes_held,
                     "held_bytes_per_token_stored": stats.kv_bytes_held / (used / stats.kv_bytes_per_token)})
    return rows


def target_forward_times(runner, prompt: list[int], widths: list[int], repeats: int = 5) -> dict[int, float]:
    """Median seconds of one forward over k new tokens after the prompt, for each k."""
    import torch

    from slimlm.infer import ContiguousCache

    times = {}
    for width in widths:
        samples = []
        for _ in range(repeats):
            cache = ContiguousCache(runner.cache_shape(), 1, len(prompt) + width)
            runner.forward(torch.tensor([prompt]), [len(prompt)], cache)
            start = time.perf_counter()
            runner.forward(torch.tensor([prompt[:width]]), [width], cache, all_logits=True)
            samples.append(time.perf_counter() - start)
        times[width] = statistics.median(samples)
    return times


def speculative_rows(target, drafts: dict, text_ids, args) -> tuple[list[dict], list[dict]]:
    from slimlm.infer import ModelRunner, generate_ids, speculative_decode

    prompt = text_ids[:64].tolist()
    new = 2 * args.new_tokens
    target_runner = ModelRunner(target)
    plain_time, plain = median_run(lambda: _timed(lambda: generate_ids(target_runner, [prompt], new).tokens[0]),
                                   args.repeats)
    rows = [{"decoding": "plain greedy", "draft": "-", "gamma": "-", "tokens": len(plain), "seconds": plain_time,
             "tokens_per_s": len(plain) / plain_time, "speedup": 1.0}]
    cost_rows = []
    gammas = [4] if args.quick else [2, 4, 6]
    forward_times = target_forward_times(target_runner, prompt, sorted({1, *[g + 1 for g in gammas]}))
    for name, draft in drafts.items():
        draft_runner = ModelRunner(draft)
        draft_step = target_forward_times(draft_runner, prompt, [1])[1]
        for gamma, adaptive in [(g, False) for g in gammas] + [(4, True)]:
            seconds, (tokens, stats) = median_run(
                lambda: _timed(lambda: speculative_decode(target_runner, draft_runner, prompt, new, gamma,
                                                          adaptive=adaptive)), args.repeats)
            if tokens != plain:
                raise AssertionError(f"greedy speculative decoding with {name} changed the output")
            alpha = stats.acceptance_rate
            verify_ratio = forward_times[gamma + 1] / forward_times[1]
            expected = _expected_speedup(alpha, gamma, draft_step / forward_times[1], verify_ratio)
            rows.append({"decoding": "speculative" + (" adaptive" if adaptive else ""), "draft": name,
                         "gamma": f"{gamma}->{stats.final_gamma}" if adaptive else gamma, "tokens": len(tokens),
                         "seconds": seconds, "tokens_per_s": len(tokens) / seconds, "speedup": plain_time / seconds,
                         "acceptance_rate": alpha, "tokens_per_target_forward": stats.tokens_per_target_forward,
                         "expected_speedup": None if adaptive else expected})
        cost_rows.append({"draft": name, "target_step_s": forward_times[1], "draft_step_s": draft_step,
                          "cost_ratio_c": draft_step / forward_times[1],
                          **{f"target_forward_{k}_tokens_s": v for k, v in forward_times.items()},
                          **{f"speedup_if_all_accepted_gamma_{g}": _expected_speedup(
                              1.0, g, draft_step / forward_times[1], forward_times[g + 1] / forward_times[1])
                             for g in gammas}})
    return rows, cost_rows


def _timed(function):
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def _expected_speedup(alpha: float, gamma: int, cost_ratio: float, verify_ratio: float) -> float:
    """Leviathan et al. Eq. 1 / Theorem 3.8 with the target's (gamma+1)-token forward costing verify_ratio steps."""
    tokens = gamma + 1 if alpha >= 1 else (1 - alpha ** (gamma + 1)) / (1 - alpha)
    return tokens / (gamma * cost_ratio + verify_ratio)


def sinks_rows(model, text_ids, args) -> list[dict]:
    import torch
    import torch.nn.functional as F

    from slimlm.infer import ModelRunner, streaming_perplexity

    ids = text_ids[: args.stream_tokens].tolist()
    cache_size = 4 + args.window
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1]
    in_context = F.cross_entropy(logits.float(), torch.tensor(ids[1:]), reduction="none").tolist()
    runner = ModelRunner(model)
    results = {"in context (full attention)": in_context}
    for label, sink, window in (("4 sinks + window", 4, args.window), ("window only", 0, cache_size)):
        results[label] = streaming_perplexity(runner, ids, sink, window)[1]
    rows = []
    for label, losses in results.items():
        tail = losses[cache_size - 1:]  # predictions made after the cache first filled
        rows.append({"attention": label, "cache_tokens": "all" if label.startswith("in context") else cache_size,
                     "text_tokens": len(ids), "ppl_all": math.exp(sum(losses) / len(losses)),
                     "ppl_after_cache_full": math.exp(sum(tail) / len(tail))})
    reference = rows[0]["ppl_after_cache_full"]
    for row in rows:
        row["ratio_to_in_context"] = row["ppl_after_cache_full"] / reference
    return rows


def main() -> None:
    args = options()
    import torch

    from slimlm.compress import compress
    from slimlm.data.calibration import calibration_samples, tokenize_corpus
    from slimlm.data.corpora import load_corpus
    from slimlm.models.loading import load_model
    from slimlm.results import library_versions, machine_info, markdown_table, utc_now, write_results

    loaded = load_model(args.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    text_ids = tokenize_corpus(tokenizer, load_corpus("pydoc", split="eval"))
    calibration = calibration_samples(tokenizer, "pydoc", 8 if args.quick else 32, 256, 0)
    quantized = copy.deepcopy(model)
    compress(quantized, "rtn-w4g64")
    drafts = {}
    for count in (int(part) for part in args.draft_drop.split(",")):
        dropped = copy.deepcopy(model)
        compress(dropped, {"stages": [{"method": "drop_layers", "count": count}]}, calibration)
        drafts[f"drop {count} of {len(model.model.layers)} blocks"] = dropped
    variants = {"float32": model, "rtn-w4g64": quantized, **drafts}
    started = time.perf_counter()
    sections = {
        "latency": latency_rows(variants, text_ids, args),
        "kv_memory": memory_rows(model, text_ids, args),
    }
    sections["speculative"], sections["speculative_cost"] = speculative_rows(model, drafts, text_ids, args)
    sections["sinks"] = sinks_rows(model, text_ids, args)
    record = {"benchmark": "generation", "model": args.model, "quick": args.quick, "protocol": vars(args),
              "machine": machine_info(), "versions": library_versions(), "date": utc_now(),
              "command": shlex.join([sys.executable, *sys.argv]), "torch_threads": torch.get_num_threads(),
              "seconds": time.perf_counter() - started, "sections": sections}
    tables = "".join(f"## {name}\n\n{markdown_table(rows)}\n" for name, rows in sections.items())
    preamble = (f"# Generation benchmark ({'quick protocol' if args.quick else 'full protocol'})\n\n"
                f"Model {args.model} (float32), {torch.get_num_threads()} torch threads, {record['date']}. "
                f"Command: `{record['command']}`. See the docstring of benchmarks/generation.py for the protocol.")
    json_path, md_path = write_results(args.out, [record], tables, preamble)
    print(preamble + "\n\n" + tables)
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
