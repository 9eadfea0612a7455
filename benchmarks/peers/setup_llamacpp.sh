#!/usr/bin/env bash
# Create (idempotently) the virtual environment with llama-cpp-python, built from its source
# distribution (PyPI has no CPU wheel for it): about 4 minutes on 2 cores, needs cmake and a C++ compiler.
#
#   bash benchmarks/peers/setup_llamacpp.sh
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${VENV:-$HERE/.venv-llamacpp}"
PYTHON="${PYTHON:-python3}"
VERSION="0.3.36"

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$VERSION')" 2>/dev/null; then
    exit 0
fi
"$PYTHON" -m venv "$VENV"
# A native build (GGML_NATIVE=ON: AVX-512, AMX) crashed in its first evaluation on this machine
# (segmentation fault); the portable AVX2 build below runs.
CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON \
-DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF -DLLAMA_CURL=OFF -DGGML_OPENMP=OFF" \
    "$VENV/bin/pip" install --no-binary llama-cpp-python "llama-cpp-python==$VERSION"
