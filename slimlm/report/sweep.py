"""`slimlm compare`: the float model and each recipe on the same calibration and evaluation tokens, one row
each, every finished row cached in the output folder.

A row's cache key is a hash of everything that decides its numbers (model, dtype, the recipe resolved to its
stages and calibration, the evaluation and speed settings, slimlm's version): rerunning the same sweep reads
every row back, adding a recipe runs only that one, and changing a setting reruns the rows it affects. A
failed row is recorded with its error and tried again on the next run. Rows run one at a time, each in a
child process (`slimlm.report.row`), so each row's peak memory is its own and an interrupted sweep loses at
most the row it was running.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from slimlm.errors import SlimlmError

FLOAT_ROW = "float"


@dataclass(frozen=True)
class EvalPlan:
    tasks: list[str] = field(default_factory=lambda: ["wikitext2"])
    seqlen: int = 512
    max_windows: int | None = 40
    limit: int | None = 200
    batch_size: int = 16


@dataclass(frozen=True)
class SpeedPlan:
    prompt_tokens: int = 128
    new_tokens: int = 32
    repeats: int = 3


@dataclass(frozen=True)
class Sweep:
    """What `slimlm compare` runs: the model, the recipes (preset names or YAML files) and the shared settings."""

    model: str
    recipes: list[str]
    out: Path
    eval: EvalPlan = EvalPlan()
    speed: SpeedPlan = SpeedPlan()
    calibration: dict = field(default_factory=dict)  # corpus / samples / seqlen / seed overrides, None = recipe's
    kl: bool = True
    data_dir: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    trust_remote_code: bool = False
    seed: int = 0


def check_sweep(sweep: Sweep) -> None:
    """Every recipe name, task name and calibration override checked before any row runs."""
    from slimlm.compress import load_recipe, with_calibration
    from slimlm.eval.runner import parse_tasks

    parse_tasks(sweep.eval.tasks)
    if not sweep.recipes:
        raise SlimlmError("no recipe given: pass --recipes with a comma-separated list, e.g. --recipes gptq-w4g64")
    duplicates = sorted({r for r in sweep.recipes if sweep.recipes.count(r) > 1})
    if duplicates:
        raise SlimlmError(f"--recipes names {', '.join(duplicates)} more than once: give each recipe once")
    for name in sweep.recipes:
        with_calibration(load_recipe(name), **sweep.calibration)


def row_spec(sweep: Sweep, recipe: str | None) -> dict:
    """What the child process for one row needs; also what the row's cache key hashes."""
    from slimlm.compress import load_recipe, with_calibration
    from slimlm.version import __version__

    resolved = None
    if recipe is not None:
        resolved = with_calibration(load_recipe(recipe), **sweep.calibration)
        resolved = resolved.model_dump(mode="json")
    return {
        "name": FLOAT_ROW if recipe is None else recipe,
        "model": sweep.model, "dtype": sweep.dtype, "device": sweep.device,
        "trust_remote_code": sweep.trust_remote_code, "seed": sweep.seed,
        "recipe": resolved, "calibration": {k: v for k, v in sweep.calibration.items() if v is not None},
        "data_dir": None if sweep.data_dir is None else str(sweep.data_dir),
        "eval": asdict(sweep.eval), "speed": asdict(sweep.speed), "kl": sweep.kl and recipe is not None,
        "slimlm": __version__,
    }


def row_key(spec: dict) -> str:
    """A hash of everything that decides a row's numbers (the data directory's location is left out: the
    same files elsewhere give the same row)."""
    decisive = {k: v for k, v in spec.items() if k != "data_dir"}
    return hashlib.sha256(json.dumps(decisive, sort_keys=True).encode()).hexdigest()[:16]


def row_path(out: Path, name: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._+-]", "_", Path(name).name if name.endswith((".yaml", ".yml")) else name)
    return out / "rows" / f"{safe}.json"


def cached_row(path: Path, key: str) -> dict | None:
    """The finished row at `path` if it was measured with these exact settings."""
    if not path.is_file():
        return None
    try:
        row = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return row if row.get("key") == key and row.get("status") == "ok" else None


def run_sweep(sweep: Sweep, on_event=None) -> list[dict]:
    """Every row of the sweep, float first, in the order given; finished rows are read from the cache."""
    from slimlm.results import atomic_write_text, library_versions, machine_info, utc_now

    check_sweep(sweep)
    names: list[str | None] = [None, *sweep.recipes]
    say = on_event or (lambda text: print(text, file=sys.stderr, flush=True))
    rows, timed = [], []
    for index, recipe in enumerate(names):
        spec = row_spec(sweep, recipe)
        key, path = row_key(spec), row_path(sweep.out, spec["name"])
        label = f"[{index + 1}/{len(names)}] {spec['name']}"
        row = cached_row(path, key)
        if row is not None:
            say(f"slimlm compare: {label}: cached ({path})")
        else:
            say(f"slimlm compare: {label}: running{_eta(timed, len(names) - index)}")
            start = time.perf_counter()
            row = {"name": spec["name"], "key": key, "spec": spec, **_run_child(spec),
                   "machine": machine_info(), "versions": library_versions(), "date": utc_now()}
            timed.append(time.perf_counter() - start)
            atomic_write_text(path, json.dumps(row, indent=1) + "\n")
            state = "done" if row["status"] == "ok" else f"FAILED: {row['error']}"
            say(f"slimlm compare: {label}: {state} in {timed[-1]:.0f} s")
        rows.append(row)
    return rows


def _eta(timed: list[float], left: int) -> str:
    if not timed:
        return ""
    seconds = sum(timed) / len(timed) * left
    return f" (about {seconds / 60:.1f} min left for {left} row{'s' if left > 1 else ''})"


def _run_child(spec: dict) -> dict:
    """Run one row in a fresh Python process; a crash becomes a failed row with the end of its stderr."""
    with tempfile.TemporaryDirectory(prefix="slimlm-row-") as directory:
        spec_path, out_path = Path(directory) / "spec.json", Path(directory) / "row.json"
        spec_path.write_text(json.dumps(spec), encoding="utf-8")
        done = subprocess.run([sys.executable, "-m", "slimlm.report.row", str(spec_path), str(out_path)],
                              stdout=subprocess.PIPE, stderr=None, text=True)
        if done.returncode != 0 or not out_path.is_file():
            return {"status": "failed", "error": f"the row's process exited with code {done.returncode} (its "
                                                 "error is printed above)"}
        return json.loads(out_path.read_text(encoding="utf-8"))
