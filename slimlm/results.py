"""Results that carry their context: every record says what was measured, how, where and when.

A record is a plain dict: `{"model", "method", "protocol", "metrics", "machine", "versions", "date",
"command"}`; `write_results` saves a list of them as JSON and a markdown table side by side, each
file written atomically (temporary file, then rename).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shlex
import sys
import tempfile
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import torch

from slimlm.errors import SlimlmError
from slimlm.version import __version__


def machine_info() -> dict[str, object]:
    return {
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def library_versions() -> dict[str, str]:
    versions = {"slimlm": __version__}
    for name in ("torch", "transformers", "safetensors", "gguf", "numpy"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()


def make_record(model: str, method: str, protocol: dict, metrics: dict, command: str | None = None) -> dict:
    return {
        "model": model,
        "method": method,
        "protocol": protocol,
        "metrics": metrics,
        "machine": machine_info(),
        "versions": library_versions(),
        "date": utc_now(),
        "command": command if command is not None else shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }


def check_writable(path: str | Path, what: str) -> None:
    """Fail before any work if `path` (a file or directory to be created, parents included) cannot be written:
    a temporary file is created and removed in the nearest existing folder on its way."""
    target = Path(path).expanduser()
    existing = target.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise SlimlmError(f"cannot write {what} {target}: {existing} is a file, not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".slimlm-write-check-"):
            pass
    except OSError as error:
        raise SlimlmError(f"cannot write {what} {target}: {error.strerror} in {existing}; choose a writable "
                          "location") from None


def current_umask() -> int:
    """The process umask (reading it means setting it: it is put back at once)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` so that readers see the old file or the new one, never half of one."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())  # on disk before the rename publishes it
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp creates 0600; a new file follows the umask
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def format_value(value: object) -> str:
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:.4f}"
    if isinstance(value, int) and abs(value) >= 10_000:
        return f"{value:,}"
    return "" if value is None else str(value)


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """A markdown table of `rows` (dicts); columns default to the keys in first-seen order."""
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(format_value(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_results(stem: str | Path, records: list[dict], table: str, preamble: str = "") -> tuple[Path, Path]:
    """Write `<stem>.json` (the records) and `<stem>.md` (preamble + table), atomically."""
    stem = Path(stem)
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    atomic_write_text(json_path, json.dumps(records, indent=2, sort_keys=False) + "\n")
    atomic_write_text(md_path, (preamble + "\n\n" if preamble else "") + table)
    return json_path, md_path
