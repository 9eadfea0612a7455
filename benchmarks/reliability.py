"""Reliability of the command line: bad input refused before any work, and compression that survives kill -9.

1. Bad inputs: every case of `tests/test_bad_inputs.py` (the issue's 19 and those added since) run as a user
   runs it, in its own process: exit code, the message, seconds to the refusal, and whether anything was
   written (the output folder, a staging or checkpoint folder).
2. Kill campaign: GPTQ W4 g64 of a tiny random Llama of 24 blocks (hidden 64; 32 x 128 calibration tokens of
   the embedded Python docs, one thread) run once uninterrupted, then `--kills` times killed with SIGKILL at a
   random moment of the block pass or the save after it (seeded: once the checkpoint names block b, b uniform
   in 1..24, after a further delay uniform in 0-0.25 s, about one block's time) and run again with the same
   command, which continues from the last finished block. Per kill: the block the checkpoint had reached, the
   block the rerun resumed after, whether every output file has the uninterrupted run's sha256, and anything
   left beside or inside the output folder.

3. Cost of the checkpoint: GPTQ W4 g64 of SmolLM2-135M (`--samples` x 512 tokens, two threads) with the
   checkpoint after every block and with `--no-checkpoint`, alternating, `--repeats` times each.
4. Distributed calibration: GPTQ W4 g64 of SmolLM2-135M (`--samples` x 512 C4 calibration tokens, or the
   embedded Python docs without a data directory) in one process with two threads and with
   `torchrun --nproc-per-node 2` (one thread each), alternating, `--repeats` times each: the compression
   seconds slimlm reports, the command's wall time, the bytes of the weights file that differ from those of one
   process with one thread (run once: the kernels each of the two processes runs), and WikiText-2 perplexity
   (8 windows of 512).

    python benchmarks/reliability.py --data-dir ../shared/data             # about 25 minutes on 2 cores
    python benchmarks/reliability.py --kills 3 --parts bad-inputs,kills   # a check of the script
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parts", default="bad-inputs,kills,checkpoint-cost,distributed",
                        help="comma-separated: bad-inputs, kills, checkpoint-cost, distributed")
    parser.add_argument("--data-dir", help="data directory (C4 calibration, WikiText-2 evaluation)")
    parser.add_argument("--samples", type=int, default=32, help="calibration segments of the distributed part")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each launcher in the distributed part")
    parser.add_argument("--out", default=str(RESULTS / "reliability"))
    args = parser.parse_args()
    from slimlm.results import library_versions, machine_info, utc_now, write_results

    parts = {p.strip() for p in args.parts.split(",")}
    record: dict = {"machine": machine_info(), "versions": library_versions(), "date": utc_now(),
                    "command": shlex.join(["python", "benchmarks/reliability.py", *sys.argv[1:]])}
    with tempfile.TemporaryDirectory(prefix="slimlm-reliability-") as scratch:
        root = Path(scratch)
        if "bad-inputs" in parts:
            record["bad_inputs"] = bad_inputs(root / "bad")
        if "kills" in parts:
            record["kills"] = kill_campaign(root / "kills", args.kills, args.seed)
        if "checkpoint-cost" in parts:
            record["checkpoint_cost"] = checkpoint_cost(root / "cost", args.data_dir, args.samples, args.repeats)
        if "distributed" in parts:
            record["distributed"] = distributed_calibration(root / "distributed", args.data_dir, args.samples,
                                                            args.repeats)
    write_results(args.out, [record], tables(record), preamble=preamble(record))
    print(Path(args.out).with_suffix(".md").read_text())


def bad_inputs(root: Path) -> list[dict]:
    from test_bad_inputs import CASES, build_models, cli

    root.mkdir(parents=True)
    models = build_models(root)
    rows = []
    for name, arguments, expected in CASES:
        work = root / "work" / name.replace(" ", "-").replace("/", "-")
        work.mkdir(parents=True)
        out = work / "out"
        start = time.perf_counter()
        result = cli(*(a.format(root=models, out=out) for a in arguments))
        seconds = time.perf_counter() - start
        lines = result.stderr.strip().splitlines()
        written = sorted(p.name for p in work.iterdir()) + ([f"{out}-ct"] if Path(f"{out}-ct").exists() else [])
        rows.append({"case": name, "exit_code": result.returncode, "message": lines[-1] if lines else "",
                     "expected_fragment": expected, "one_line": len(lines) == 1,
                     "refused": result.returncode == 2 and len(lines) == 1 and expected in lines[0],
                     "seconds": round(seconds, 2), "written": ", ".join(written)})
        print(f"{name}: exit {result.returncode} in {seconds:.1f} s", flush=True)
    return rows


def _digest(directory: Path) -> dict[str, str]:
    if not directory.is_dir():
        return {}
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def kill_campaign(root: Path, kills: int, seed: int) -> dict:
    from slimlm.models.tiny import save_tiny

    root.mkdir(parents=True)
    model = save_tiny(root / "tiny-llama-24", "llama", blocks=24)

    def command(out: Path) -> list[str]:
        return [sys.executable, "-m", "slimlm", "compress", "--model", str(model), "--recipe", "gptq-w4g64",
                "--calib-corpus", "pydoc", "--calib-samples", "32", "--calib-seqlen", "128", "--threads", "1",
                "--out", str(out)]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    subprocess.run(command(root / "reference"), check=True, env=env, capture_output=True)
    reference_seconds = time.perf_counter() - start
    reference = _digest(root / "reference")
    rng = random.Random(seed)
    rows = []
    for kill in range(kills):
        folder = root / f"kill-{kill:02d}"
        folder.mkdir()
        out = folder / "out"
        target, delay = rng.randint(1, 24), rng.uniform(0, 0.25)
        state = folder / ".out.resume" / "state.json"
        started = time.perf_counter()
        process = subprocess.Popen(command(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while process.poll() is None and (_checkpoint_block(state) or 0) < target:
            time.sleep(0.005)
        time.sleep(delay)
        at = time.perf_counter() - started
        ended_before_kill = process.poll() is not None
        reached = _checkpoint_block(state)
        if not ended_before_kill:
            os.kill(process.pid, signal.SIGKILL)
        process.wait()
        published = out.exists()  # the kill came after the output was renamed into place: nothing to redo
        start = time.perf_counter()
        rerun = None if published else subprocess.run(command(out), env=env, capture_output=True, text=True)
        rerun_seconds = time.perf_counter() - start
        resumed = next((line.split("after block ")[1].split(" ")[0] for line in rerun.stderr.splitlines()
                        if "resuming after block" in line), None) if rerun else None
        leftovers = sorted(p.name for p in folder.iterdir() if p.name != "out")
        inside = sorted(set(_digest(out)) - set(reference))
        rows.append({
            "kill": kill, "after_checkpoint": target, "delay_s": round(delay, 3), "killed_at_s": round(at, 2),
            "killed": not ended_before_kill,
            "checkpoint_block_at_kill": reached, "output_already_published": published,
            "rerun_exit_code": None if rerun is None else rerun.returncode,
            "resumed_after_block": None if resumed is None else int(resumed),
            "rerun_s": None if rerun is None else round(rerun_seconds, 2),
            "identical_sha256": _digest(out) == reference, "leftovers": ", ".join(leftovers + inside)})
        print(json.dumps(rows[-1]), flush=True)
    return {"reference_seconds": round(reference_seconds, 2), "blocks": 24, "rows": rows,
            "resumed_correctly": sum(r["rerun_exit_code"] in (0, None) and r["identical_sha256"] for r in rows),
            "identical": sum(r["identical_sha256"] for r in rows),
            "without_leftovers": sum(not r["leftovers"] for r in rows)}


def _gptq_arguments(data_dir: str | None, samples: int, evaluate: bool = True) -> list[str]:
    data = ["--data-dir", data_dir, "--calib-corpus", "c4"] if data_dir else ["--calib-corpus", "pydoc"]
    if evaluate:
        data += ["--eval", "wikitext2" if data_dir else "pydoc", "--seqlen", "512", "--max-windows", "8"]
    return ["compress", "--model", "smollm2-135m", "--recipe", "gptq-w4g64", "--calib-samples", str(samples),
            "--calib-seqlen", "512", *data]


def checkpoint_cost(root: Path, data_dir: str | None, samples: int, repeats: int) -> dict:
    """GPTQ's compression seconds with the checkpoint after every block and with --no-checkpoint, alternating."""
    import statistics

    root.mkdir(parents=True)
    base = [sys.executable, "-m", "slimlm", *_gptq_arguments(data_dir, samples, evaluate=False), "--threads", "2"]
    seconds: dict[str, list[float]] = {"checkpoint": [], "no checkpoint": []}
    for repeat in range(repeats):
        for name in seconds:
            out = root / f"{repeat}-{name.replace(' ', '-')}"
            extra = ["--no-checkpoint"] if name == "no checkpoint" else []
            result = subprocess.run([*base, *extra, "--out", str(out), "--json", f"{out}.json"], capture_output=True,
                                    text=True, env={**os.environ, "SLIMLM_PROGRESS": "0"})
            if result.returncode != 0:
                raise SystemExit(f"{name} failed:\n{result.stderr[-3000:]}")
            seconds[name].append(json.loads(Path(f"{out}.json").read_text())["metrics"]["compression"]["seconds"])
            print(f"{name}: {seconds[name][-1]:.1f} s", flush=True)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    return {"samples": samples, "seconds": seconds, "median_seconds": medians,
            "ratio": medians["checkpoint"] / medians["no checkpoint"],
            "activation_bytes_per_block": samples * 512 * 576 * 4}


def distributed_calibration(root: Path, data_dir: str | None, samples: int, repeats: int) -> dict:
    import statistics

    root.mkdir(parents=True)
    arguments = _gptq_arguments(data_dir, samples)
    launchers = {"1 process x 2 threads": [sys.executable, "-m", "slimlm", *arguments, "--threads", "2"],
                 "2 processes x 1 thread": [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                            "--nproc-per-node", "2", "-m", "slimlm", *arguments, "--threads", "1"]}
    # The same kernels as each of the two processes (one thread): differences from it come from the reduction
    # alone; a different thread count changes float32 sums too, and GPTQ's rounding with them.
    launchers["1 process x 1 thread"] = [sys.executable, "-m", "slimlm", *arguments, "--threads", "1"]
    runs: dict[str, list[dict]] = {name: [] for name in launchers}
    for repeat in range(repeats):
        for name, command in launchers.items():
            if name == "1 process x 1 thread" and repeat:
                continue  # the equality reference, not timed against the others
            out = root / f"{len(runs[name])}-{name.split()[0]}x{name.split()[3]}"
            start = time.perf_counter()
            result = subprocess.run([*command, "--out", str(out), "--json", f"{out}.json"], capture_output=True,
                                    text=True, env={**os.environ, "SLIMLM_PROGRESS": "0"})
            wall = time.perf_counter() - start
            if result.returncode != 0:
                raise SystemExit(f"{name} failed:\n{result.stderr[-3000:]}")
            metrics = json.loads(Path(f"{out}.json").read_text())["metrics"]
            runs[name].append({"out": out, "wall_s": wall, "compression_s": metrics["compression"]["seconds"],
                               "ppl": metrics["after"][0]["value"]})
            print(f"{name}: {wall:.1f} s", flush=True)
    reference = next(runs["1 process x 1 thread"][0]["out"].glob("*.safetensors")).read_bytes()
    rows = []
    for name, done in runs.items():
        weights = next(done[0]["out"].glob("*.safetensors")).read_bytes()
        differing = sum(a != b for a, b in zip(weights, reference)) + abs(len(weights) - len(reference))
        rows.append({"launcher": name, "compression_s": statistics.median(r["compression_s"] for r in done),
                     "wall_s": statistics.median(r["wall_s"] for r in done), "runs": len(done),
                     "wikitext2_ppl": done[0]["ppl"], "weight_bytes_differing": differing,
                     "weight_bytes": len(weights)})
    one, two, _ = rows
    return {"rows": rows, "compression_speedup": one["compression_s"] / two["compression_s"],
            "wall_speedup": one["wall_s"] / two["wall_s"], "samples": samples, "cores": os.cpu_count()}


def _checkpoint_block(state: Path) -> int | None:
    """The next block the checkpoint names, None when no block had finished."""
    try:
        return json.loads(state.read_text())["next_block"]
    except (OSError, ValueError, KeyError):
        return None


def preamble(record: dict) -> str:
    machine = record["machine"]
    return (f"# Reliability: bad inputs and kill -9 during compression\n\nCommand: `{record['command']}`  \n"
            f"Machine: {machine.get('cpu')}, {machine.get('cores')} cores; torch {record['versions'].get('torch')}"
            f"  \nDate: {record['date']}\n\nBad inputs: each case of tests/test_bad_inputs.py in its own process "
            "(seconds include Python start-up and imports). Kills: GPTQ W4 g64 of a tiny random Llama of 24 blocks "
            "(32 x 128 calibration tokens, one thread), SIGKILL at a random moment of the block pass or the save (once "
            "the checkpoint names block b, b uniform in 1..24, plus a delay uniform in 0-0.25 s), then the same "
            "command again. Distributed calibration: see its section.")


def tables(record: dict) -> str:
    from slimlm.results import markdown_table

    text = ""
    if "bad_inputs" in record:
        rows = record["bad_inputs"]
        refused = sum(r["refused"] for r in rows)
        fast = sum(r["seconds"] < 1.0 for r in rows)
        text += (f"## Bad inputs\n\n{refused} of {len(rows)} refused before any work with exit code 2 and one line; "
                 f"{fast} of {len(rows)} in under 1 s.\n\n")
        text += markdown_table(rows, ("case", "exit_code", "refused", "seconds", "written", "message")) + "\n\n"
    if "kills" in record:
        kills = record["kills"]
        n = len(kills["rows"])
        text += (f"## Kill campaign\n\nUninterrupted run: {kills['reference_seconds']} s. Of {n} kills: "
                 f"{kills['resumed_correctly']} ended with byte-identical files (the rerun exited with 0, or "
                 "the output was already published when the kill came), "
                 f"{kills['identical']} identical sha256, {kills['without_leftovers']} without leftovers.\n\n")
        text += markdown_table(kills["rows"]) + "\n"
    if "checkpoint_cost" in record:
        cost = record["checkpoint_cost"]
        text += (f"\n## Cost of the checkpoint\n\nGPTQ W4 g64, SmolLM2-135M, {cost['samples']} x 512 calibration "
                 f"tokens ({cost['activation_bytes_per_block'] / 1e6:.0f} MB of activations written after each of 30 "
                 f"blocks): compression seconds with the checkpoint / without = {cost['ratio']:.3f} (medians of "
                 "alternating runs).\n\n")
        text += markdown_table([{"run": name, "median_seconds": cost["median_seconds"][name],
                                 "seconds": ", ".join(f"{v:.1f}" for v in values)}
                                for name, values in cost["seconds"].items()]) + "\n"
    if "distributed" in record:
        spread = record["distributed"]
        text += (f"\n## Distributed calibration\n\nGPTQ W4 g64, SmolLM2-135M, {spread['samples']} x 512 calibration "
                 f"tokens, on {spread['cores']} cores: two processes against one, compression "
                 f"{spread['compression_speedup']:.3f}x, whole command {spread['wall_speedup']:.3f}x "
                 "(medians, alternating runs). weight_bytes_differing: bytes of the saved weights file that "
                 "differ from the one-process, one-thread file (the kernels each of the two processes runs).\n\n")
        text += markdown_table(spread["rows"]) + "\n"
    return text


if __name__ == "__main__":
    main()
