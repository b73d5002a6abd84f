#!/usr/bin/env bash
# Build llama.cpp's own llama-imatrix, llama-quantize and llama-perplexity from the llama.cpp
# source vendored in the llama-cpp-python sdist pinned in requirements.lock (the same source the
# project's llama_cpp bindings were compiled from). cmake comes from PyPI in a throwaway venv
# (never the project's lock). Binaries: benchmarks/peers/llamacpp/build/bin/. About 10 minutes
# on 2 cores. Usage: benchmarks/peers/llamacpp/build.sh  (or `make peers-llamacpp`)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../../.." && pwd)"
PYTHON="${PYTHON:-python3}"
JOBS="${JOBS:-2}"
VERSION="$(sed -n 's/^llama-cpp-python==\([^ ]*\).*/\1/p' "$ROOT/requirements.lock")"
[ -n "$VERSION" ] || { echo "build.sh: no llama-cpp-python pin in requirements.lock" >&2; exit 1; }
SDIST="$HERE/sdist"
BUILD="$HERE/build"
SRC="$SDIST/llama_cpp_python-$VERSION/vendor/llama.cpp"

mkdir -p "$SDIST" "$BUILD"
if [ ! -d "$SRC" ]; then
  ARCHIVE="$SDIST/llama_cpp_python-$VERSION.tar.gz"
  if [ ! -f "$ARCHIVE" ]; then
    "$PYTHON" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$SDIST"
  fi
  tar -xzf "$ARCHIVE" -C "$SDIST"
fi

# cmake from PyPI, in a venv of its own.
if [ ! -x "$BUILD/cmake-venv/bin/cmake" ]; then
  "$PYTHON" -m venv "$BUILD/cmake-venv"
  "$BUILD/cmake-venv/bin/python" -m pip install -q cmake
fi
CMAKE="$BUILD/cmake-venv/bin/cmake"

# Static libraries: the three binaries do not depend on libllama.so/libggml.so at run time.
"$CMAKE" -S "$SRC" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release \
  -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DBUILD_SHARED_LIBS=OFF
"$CMAKE" --build "$BUILD" --config Release -j "$JOBS" \
  --target llama-perplexity llama-quantize llama-imatrix

for tool in llama-perplexity llama-quantize llama-imatrix; do
  test -x "$BUILD/bin/$tool" || { echo "build.sh: $BUILD/bin/$tool missing" >&2; exit 1; }
  echo "$BUILD/bin/$tool"
done
