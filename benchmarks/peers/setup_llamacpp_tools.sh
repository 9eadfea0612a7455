#!/usr/bin/env bash
# Build (idempotently) llama.cpp's `llama-imatrix` and `llama-quantize` command-line tools from the
# llama.cpp vendored in llama-cpp-python's source distribution, the same version (and the same portable
# CPU flags) as the library that setup_llamacpp.sh builds. llama-cpp-python exposes
# `llama_model_quantize` (which accepts an importance matrix) but not llama-imatrix, which computes one.
# About 5 minutes on 2 cores; needs pip (to fetch the sdist from PyPI or pip's cache), cmake and a C++ compiler.
#
#   bash benchmarks/peers/setup_llamacpp_tools.sh      # -> benchmarks/peers/llamacpp-tools/bin/llama-{imatrix,quantize}
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TOOLS="${TOOLS:-$HERE/llamacpp-tools}"
PYTHON="${PYTHON:-python3}"
VERSION="0.3.36"
JOBS="${JOBS:-2}"
STAMP="$TOOLS/bin/.llama-cpp-python-$VERSION"

built() { [ -f "$STAMP" ] && [ -x "$TOOLS/bin/llama-imatrix" ] && [ -x "$TOOLS/bin/llama-quantize" ]; }
if built; then
    exit 0
fi
mkdir -p "$TOOLS/src" "$TOOLS/bin"
exec 9>"$TOOLS/.lock"  # one build at a time; a second caller waits for the first, then finds the tools built
flock 9
if built; then
    exit 0
fi
SDIST="$TOOLS/src/llama_cpp_python-$VERSION.tar.gz"
if [ ! -f "$SDIST" ]; then
    "$PYTHON" -m pip download --no-deps --no-binary :all: --dest "$TOOLS/src" "llama-cpp-python==$VERSION"
fi
SOURCE="$TOOLS/src/llama_cpp_python-$VERSION"
if [ ! -f "$SOURCE/vendor/llama.cpp/CMakeLists.txt" ]; then
    rm -rf "$SOURCE"
    tar -xzf "$SDIST" -C "$TOOLS/src" "llama_cpp_python-$VERSION/vendor/llama.cpp"
fi
# A native build (GGML_NATIVE=ON: AVX-512, AMX) crashed on this machine (see setup_llamacpp.sh);
# the portable AVX2 build below matches the library's.
cmake -S "$SOURCE/vendor/llama.cpp" -B "$TOOLS/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
    -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF \
    -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF -DLLAMA_CURL=OFF -DGGML_OPENMP=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON
cmake --build "$TOOLS/build" --config Release --target llama-imatrix llama-quantize -j "$JOBS"
for tool in llama-imatrix llama-quantize; do
    cp "$TOOLS/build/bin/$tool" "$TOOLS/bin/$tool"
done
touch "$STAMP"
