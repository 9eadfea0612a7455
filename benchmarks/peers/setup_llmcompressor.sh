#!/usr/bin/env bash
# Create (idempotently) the virtual environment in which llm-compressor runs beside slimlm.
#
#   bash benchmarks/peers/setup_llmcompressor.sh            # create or repair
#   FORCE=1 bash benchmarks/peers/setup_llmcompressor.sh    # rebuild from scratch
#   PYTHON=/path/to/python3.11 bash ...                     # choose the interpreter
#
# Versions (see shared/docs/anchor-tools.md): torch 2.13.0 (CPU build; installed first and by
# exact version, then pinned by a constraints file so no resolver can swap in another build),
# llmcompressor 0.14.0.1, compressed-tensors 0.19.0, transformers 5.17.0.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${VENV:-$HERE/.venv-llmcompressor}"
PYTHON="${PYTHON:-python3}"

TORCH_VERSION="2.13.0"
LLMCOMPRESSOR_VERSION="0.14.0.1"
COMPRESSED_TENSORS_VERSION="0.19.0"
TRANSFORMERS_VERSION="5.17.0"

PY="$VENV/bin/python"

check_versions() {
    # Exit status 0 when every pinned package is installed at its version and imports.
    [ -x "$PY" ] || return 1
    "$PY" - "$TORCH_VERSION" "$LLMCOMPRESSOR_VERSION" "$COMPRESSED_TENSORS_VERSION" \
        "$TRANSFORMERS_VERSION" <<'PYEOF' >/dev/null 2>&1
import sys
from importlib.metadata import version
want = dict(zip(["torch", "llmcompressor", "compressed-tensors", "transformers"], sys.argv[1:]))
for name, v in want.items():
    got = version(name)
    if got.split("+")[0] != v:
        sys.exit(1)
import torch
if torch.version.cuda is not None:  # a CUDA build slipped in
    sys.exit(1)
import datasets, safetensors, compressed_tensors, llmcompressor  # noqa: F401
PYEOF
}

if [ "${FORCE:-0}" = "1" ] && [ -d "$VENV" ]; then
    echo "[setup] FORCE=1: removing $VENV"
    rm -rf "$VENV"
fi

if check_versions; then
    echo "[setup] $VENV already has the pinned versions"
else
    if [ ! -x "$PY" ]; then
        echo "[setup] creating $VENV with $("$PYTHON" --version 2>&1)"
        "$PYTHON" -m venv "$VENV"
    fi
    "$PY" -m pip install --quiet --upgrade pip setuptools wheel

    # Constraints that hold for every later install: the exact CPU torch build stays put.
    CONSTRAINTS="$VENV/peer-constraints.txt"
    cat > "$CONSTRAINTS" <<CEOF
torch==$TORCH_VERSION+cpu
transformers==$TRANSFORMERS_VERSION
compressed-tensors==$COMPRESSED_TENSORS_VERSION
llmcompressor==$LLMCOMPRESSOR_VERSION
CEOF

    # 1) torch first, exact version, and only the CPU build ("+cpu" local version: a plain
    #    "torch==X" from PyPI would be the CUDA build with gigabytes of nvidia-* wheels).
    #    pip's configured find-links / indexes come first (these machines keep the wheel on
    #    disk, /opt/wheels); PyTorch's own CPU index is the fallback, with a short timeout.
    TORCH_SPEC="torch==$TORCH_VERSION+cpu"
    echo "[setup] installing $TORCH_SPEC"
    if ! "$PY" -m pip install --quiet "$TORCH_SPEC"; then
        echo "[setup] $TORCH_SPEC not found through pip's configured sources; trying PyTorch's CPU index"
        "$PY" -m pip install --quiet --timeout 30 --retries 1 \
            --extra-index-url https://download.pytorch.org/whl/cpu "$TORCH_SPEC"
    fi

    # 2) the rest, with torch held at the version just installed.
    echo "[setup] installing llmcompressor $LLMCOMPRESSOR_VERSION and friends"
    "$PY" -m pip install --quiet -c "$CONSTRAINTS" \
        "llmcompressor==$LLMCOMPRESSOR_VERSION" \
        "compressed-tensors==$COMPRESSED_TENSORS_VERSION" \
        "transformers==$TRANSFORMERS_VERSION" \
        datasets safetensors

    if ! check_versions; then
        echo "[setup] ERROR: the venv does not hold the pinned versions after install" >&2
        "$PY" -m pip list 2>/dev/null | grep -i -E '^(torch|llmcompressor|compressed-tensors|transformers) ' >&2 || true
        exit 1
    fi
fi

"$PY" - <<'PYEOF'
from importlib.metadata import version
import sys, torch
print(f"python             {sys.version.split()[0]}")
for name in ["torch", "llmcompressor", "compressed-tensors", "transformers", "datasets", "accelerate", "safetensors"]:
    print(f"{name:<18} {version(name)}")
print(f"torch cuda build   {torch.version.cuda}")
PYEOF
echo "[setup] python: $PY"
