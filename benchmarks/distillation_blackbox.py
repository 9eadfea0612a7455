"""Black-box distillation against a real OpenAI-compatible server: llama.cpp (llama-cpp-python's server) serving
the embedded SmolLM2-135M GGUF on 127.0.0.1, started and stopped here.

    python benchmarks/distillation_blackbox.py [--instructions 16] [--steps 8]

What runs: `slimlm distill --method seqkd --teacher-url http://127.0.0.1:PORT --self-instruct N` with the seed
tasks below. The server's teacher writes N new instructions (Self-Instruct, ROUGE-L filtered) and answers
the seeds and its instructions; the student (the embedded model, float32, in slimlm) is fine-tuned on the
answers. Also checked: a URL where nothing listens fails before any model is loaded. Writes
benchmarks/results/distillation-blackbox.{json,md} with the kept instructions, sample answers, the training
losses and the times.

The server comes from `benchmarks/peers/setup_llamacpp.sh` (built from source) plus its `[server]` extra.
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / "peers" / ".venv-llamacpp"
RESULTS = ROOT / "results"
SEEDS = [  # written for this benchmark
    "Give three tips for staying focused while studying.",
    "Explain what a prime number is to a ten-year-old.",
    "Write a short thank-you note to a neighbour who watered your plants.",
    "List four fruits that are rich in vitamin C.",
    "Describe the water cycle in two sentences.",
    "Suggest a name for a bakery that sells only bread.",
    "Convert 5 kilometres to miles and show the calculation.",
    "Summarise the plot of Little Red Riding Hood in one sentence.",
    "What is the difference between weather and climate?",
    "Write a haiku about autumn leaves.",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(gguf: Path, port: int, log: Path) -> subprocess.Popen:
    if not (VENV / "bin" / "python").exists():
        subprocess.run(["bash", str(ROOT / "peers" / "setup_llamacpp.sh")], check=True)
        subprocess.run([str(VENV / "bin" / "pip"), "install", "-q", "llama-cpp-python[server]==0.3.36"], check=True)
    server = subprocess.Popen([str(VENV / "bin" / "python"), "-m", "llama_cpp.server", "--model", str(gguf),
                               "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--n_threads", "2"],
                              stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as response:
                json.loads(response.read())
                return server
        except OSError:
            if server.poll() is not None:
                raise SystemExit(f"the llama.cpp server exited: see {log}")
            time.sleep(1)
    server.terminate()
    raise SystemExit(f"the llama.cpp server did not answer within 120 s: see {log}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instructions", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", default=str(RESULTS / "distillation-blackbox"))
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT.parent))
    from slimlm.models.loading import embedded_gguf_path
    from slimlm.results import atomic_write_text

    work = Path(tempfile.mkdtemp(prefix="slimlm-blackbox-"))
    seeds = work / "seeds.jsonl"
    seeds.write_text("".join(json.dumps({"instruction": text}) + "\n" for text in SEEDS))
    port = free_port()
    slimlm = [sys.executable, "-m", "slimlm", "distill", "--method", "seqkd", "--student", "smollm2-135m",
              "--data", str(seeds), "--seqlen", "256", "--steps", str(args.steps), "--batch-size", "4",
              "--lr", "1e-5", "--max-new-tokens", "96"]
    unreachable_start = time.perf_counter()
    refused = subprocess.run([*slimlm, "--teacher-url", f"http://127.0.0.1:{free_port()}", "--out",
                              str(work / "never")], capture_output=True, text=True)
    refused_seconds = time.perf_counter() - unreachable_start
    started = time.perf_counter()
    server = start_server(embedded_gguf_path("smollm2-135m"), port, work / "server.log")
    server_seconds = time.perf_counter() - started
    try:
        run_start = time.perf_counter()
        result = subprocess.run([*slimlm, "--teacher-url", f"http://127.0.0.1:{port}", "--teacher-model",
                                 "smollm2-135m", "--self-instruct", str(args.instructions), "--out", str(work / "out"),
                                 "--json", str(work / "record.json")], capture_output=True, text=True)
        run_seconds = time.perf_counter() - run_start
    finally:
        server.terminate()
        server.wait(timeout=30)
    if result.returncode != 0:
        raise SystemExit(f"slimlm distill failed:\n{result.stderr[-3000:]}")
    record = json.loads((work / "record.json").read_text())
    kept = (work / "out" / "instructions.jsonl").read_text().splitlines()
    instructions = [json.loads(line)["instruction"] for line in kept]
    answers = [json.loads(line) for line in (work / "out" / "teacher_responses.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in json.loads((work / "out" / "loss.json").read_text())]
    meta = {"command": "python " + " ".join(sys.argv), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.processor() or platform.machine()}", "server": "llama-cpp-python[server] 0.3.36 "
            "(benchmarks/peers/setup_llamacpp.sh: GGML_NATIVE=OFF, AVX2), the embedded SmolLM2-135M Q4_1 GGUF"}
    summary = {"meta": meta, "unreachable_url": {"exit_code": refused.returncode, "seconds": refused_seconds,
                                                 "message": refused.stderr.strip().splitlines()[-1]},
               "server_start_seconds": server_seconds, "run_seconds": run_seconds,
               "instructions_requested": args.instructions, "instructions_kept": instructions,
               "answers": len(answers), "sample_answers": answers[:3] + answers[len(SEEDS):len(SEEDS) + 3],
               "training": record["metrics"]["training"], "losses": losses}
    out = Path(args.out)
    atomic_write_text(out.with_suffix(".json"), json.dumps(summary, indent=1) + "\n")
    lines = [f"# Black-box distillation against a llama.cpp server ({meta['date']})", "",
             f"`{meta['command']}` on {meta['machine']}; teacher: {meta['server']} on 127.0.0.1, started and "
             "stopped by the script.", "",
             f"- A URL where nothing listens: exit code {refused.returncode} after {refused_seconds:.1f} s (process "
             f"start included), `{summary['unreachable_url']['message']}`.",
             f"- Server start: {server_seconds:.1f} s. `slimlm distill --method seqkd --self-instruct "
             f"{args.instructions}`: {run_seconds:.0f} s in all.",
             f"- Self-Instruct: {len(instructions)} of {args.instructions} requested instructions kept; the teacher "
             f"answered {len(answers)} prompts ({len(SEEDS)} seeds + the kept instructions).",
             f"- Student fine-tuning: {record['metrics']['training']['steps']} steps, "
             f"{record['metrics']['training']['tokens']:,} tokens, loss {losses[0]:.3f} -> {losses[-1]:.3f}.", "",
             "Kept instructions:", ""] + [f"1. {text}" for text in instructions] + ["", "Sample answers:", ""]
    lines += [f"- **{row['prompt'][:80]}** -> {row['response'][:160].strip()!r}" for row in summary["sample_answers"]]
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
